//! The `statements` read model: per-account entries with a running balance,
//! and the `transfers` table that shows one movement to either party.

use crate::copy_in::CopyRows;
use chrono::{DateTime, Utc};
use ledger_commands::store::{LogPoint, RecordedEvent};
use ledger_domain::events::TransferRecorded;
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

pub const TABLES: &[&str] = &["statement_entries", "transfers"];

/// Applies events in order, in three statements: the new transfers, the
/// accounts' last entries, and every entry, numbered and balanced in memory
/// exactly as per-event application would.
pub async fn apply_all(conn: &mut PgConnection, events: &[(&RecordedEvent, &Event)]) -> Result<(), sqlx::Error> {
    apply_knowing(conn, events, None).await.map(|_| ())
}

/// The accounts' last (entry number, balance after) as one projector wrote
/// them, with the statements checkpoint its last commit left: its point and
/// when it was saved (`updated_at`, which any other writer of the checkpoint
/// changes, a rebuild's swap that saves the same point included). While the
/// checkpoint is still that, nobody else has written entries since (after
/// a batch that began with another writer's checkpoint, the memory holds
/// only that batch's accounts, all looked up), so a
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
    /// Whether the memory was this checkpoint's own when the batch began.
    /// If not, another writer may have added entries for accounts the batch
    /// did not touch, and what the memory holds for them is not kept.
    trusted: bool,
}

impl LastEntries {
    /// After the batch's transaction committed the checkpoint at `at`,
    /// saved at `written`.
    pub fn committed(&mut self, at: LogPoint, written: DateTime<Utc>, applied: Applied) {
        if !applied.trusted || self.known.len() + applied.last.len() > REMEMBERED_ACCOUNTS {
            self.known.clear();
        }
        self.known.extend(applied.last);
        self.at = Some((at, written));
    }

    /// The remembered last entries, if the memory is the one the statements
    /// checkpoint `from`, saved at `written`, was left with by this
    /// projector's last commit; else none can be trusted.
    fn known_at(&self, from: LogPoint, written: DateTime<Utc>) -> Option<&HashMap<Uuid, (i64, Decimal)>> {
        (self.at == Some((from, written))).then_some(&self.known)
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
    let known = memory.known_at(from, written);
    let last = apply_knowing(conn, events, known).await?;
    Ok(Applied { last, trusted: known.is_some() })
}

/// Applies events, looking up the last entries of the accounts `known` (if
/// any) does not hold; returns the last entries of every account the events name.
async fn apply_knowing(
    conn: &mut PgConnection,
    events: &[(&RecordedEvent, &Event)],
    known: Option<&HashMap<Uuid, (i64, Decimal)>>,
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
    let mut listing = PgArguments::default();
    TransferColumns::of(&movements).add_to(&mut listing)?;
    let mut inserted: HashSet<Uuid> = sqlx::query_scalar_with(
        "INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                recorded_at, position)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::numeric[], $5::text[], $6::text[],
                              $7::text[], $8::timestamptz[], $9::bigint[])
         ON CONFLICT (transfer_id) DO NOTHING RETURNING transfer_id",
        listing,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    if inserted.is_empty() {
        return Ok(HashMap::new());
    }
    let mut last = last_entries(conn, known, &movements).await?;
    let mut entries: Vec<Entry> = Vec::with_capacity(inserted.len() * 2);
    // `remove`: a transfer listed twice in one batch gets its entries once, as across batches.
    for (recorded, t) in movements.iter().filter(|(_, t)| inserted.remove(&t.transfer_id)) {
        entries.extend(next_entries(&mut last, recorded, t));
    }
    let mut entering = PgArguments::default();
    EntryColumns::of(&entries).add_to(&mut entering)?;
    sqlx::query_with(
        "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                        balance_after, counterparty_account, kind, reference, recorded_at)
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::numeric[],
                              $7::numeric[], $8::uuid[], $9::text[], $10::text[], $11::timestamptz[])",
        entering,
    )
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

/// The `transfers` rows of movements, a column each, bound in table order.
pub(crate) struct TransferColumns {
    ids: Vec<Uuid>,
    froms: Vec<Uuid>,
    tos: Vec<Uuid>,
    amounts: Vec<Decimal>,
    currencies: Vec<String>,
    kinds: Vec<&'static str>,
    references: Vec<Option<String>>,
    recorded_ats: Vec<DateTime<Utc>>,
    positions: Vec<i64>,
}

impl TransferColumns {
    pub(crate) fn of(movements: &[(&RecordedEvent, &TransferRecorded)]) -> TransferColumns {
        TransferColumns {
            ids: movements.iter().map(|(_, t)| t.transfer_id).collect(),
            froms: movements.iter().map(|(_, t)| t.from_account).collect(),
            tos: movements.iter().map(|(_, t)| t.to_account).collect(),
            amounts: movements.iter().map(|(_, t)| t.amount).collect(),
            currencies: movements.iter().map(|(_, t)| t.currency.clone()).collect(),
            kinds: movements.iter().map(|(_, t)| t.kind.as_str()).collect(),
            references: movements.iter().map(|(_, t)| t.reference.clone()).collect(),
            recorded_ats: movements.iter().map(|(r, _)| r.metadata.recorded_at).collect(),
            positions: movements.iter().map(|(r, _)| r.position).collect(),
        }
    }

    /// Adds the nine columns as the query's next parameters.
    pub(crate) fn add_to(self, arguments: &mut PgArguments) -> Result<(), sqlx::Error> {
        arguments.add(self.ids).map_err(sqlx::Error::Encode)?;
        arguments.add(self.froms).map_err(sqlx::Error::Encode)?;
        arguments.add(self.tos).map_err(sqlx::Error::Encode)?;
        arguments.add(self.amounts).map_err(sqlx::Error::Encode)?;
        arguments.add(self.currencies).map_err(sqlx::Error::Encode)?;
        arguments.add(self.kinds).map_err(sqlx::Error::Encode)?;
        arguments.add(self.references).map_err(sqlx::Error::Encode)?;
        arguments.add(self.recorded_ats).map_err(sqlx::Error::Encode)?;
        arguments.add(self.positions).map_err(sqlx::Error::Encode)
    }
}

/// The `statement_entries` rows, a column each, bound in table order.
pub(crate) struct EntryColumns {
    accounts: Vec<Uuid>,
    entry_nos: Vec<i64>,
    positions: Vec<i64>,
    transfer_ids: Vec<Uuid>,
    directions: Vec<&'static str>,
    amounts: Vec<Decimal>,
    balances_after: Vec<Decimal>,
    counterparties: Vec<Uuid>,
    kinds: Vec<&'static str>,
    references: Vec<Option<String>>,
    recorded_ats: Vec<DateTime<Utc>>,
}

impl EntryColumns {
    pub(crate) fn of(entries: &[Entry]) -> EntryColumns {
        EntryColumns {
            accounts: entries.iter().map(|e| e.account).collect(),
            entry_nos: entries.iter().map(|e| e.entry_no).collect(),
            positions: entries.iter().map(|e| e.position).collect(),
            transfer_ids: entries.iter().map(|e| e.transfer_id).collect(),
            directions: entries.iter().map(|e| e.direction).collect(),
            amounts: entries.iter().map(|e| e.amount).collect(),
            balances_after: entries.iter().map(|e| e.balance_after).collect(),
            counterparties: entries.iter().map(|e| e.counterparty).collect(),
            kinds: entries.iter().map(|e| e.kind).collect(),
            references: entries.iter().map(|e| e.reference.clone()).collect(),
            recorded_ats: entries.iter().map(|e| e.recorded_at).collect(),
        }
    }

    /// Adds the eleven columns as the query's next parameters.
    pub(crate) fn add_to(self, arguments: &mut PgArguments) -> Result<(), sqlx::Error> {
        arguments.add(self.accounts).map_err(sqlx::Error::Encode)?;
        arguments.add(self.entry_nos).map_err(sqlx::Error::Encode)?;
        arguments.add(self.positions).map_err(sqlx::Error::Encode)?;
        arguments.add(self.transfer_ids).map_err(sqlx::Error::Encode)?;
        arguments.add(self.directions).map_err(sqlx::Error::Encode)?;
        arguments.add(self.amounts).map_err(sqlx::Error::Encode)?;
        arguments.add(self.balances_after).map_err(sqlx::Error::Encode)?;
        arguments.add(self.counterparties).map_err(sqlx::Error::Encode)?;
        arguments.add(self.kinds).map_err(sqlx::Error::Encode)?;
        arguments.add(self.references).map_err(sqlx::Error::Encode)?;
        arguments.add(self.recorded_ats).map_err(sqlx::Error::Encode)
    }
}

/// The entries of movements not listed yet, numbered and balanced from a
/// projector's memory (see `LastEntries`) and a lookup of the accounts it
/// lacks, for `movement_run`.
pub struct Planned {
    pub(crate) entries: Vec<Entry>,
    last: HashMap<Uuid, (i64, Decimal)>,
    trusted: bool,
}

impl Planned {
    /// What `LastEntries::committed` takes once the batch's transaction has
    /// committed these entries.
    pub(crate) fn into_applied(self) -> Applied {
        Applied { last: self.last, trusted: self.trusted }
    }
}

/// Plans the movements' entries for `movement_run`: numbered and balanced
/// from the memory where it knows the account and it is the memory this
/// checkpoint's last commit left (`from`, saved at `written`), the other
/// accounts looked up in one statement, as the per-read-model path does.
/// The caller holds the statements checkpoint's lock, so no other writer
/// adds entries meanwhile. With a memory of another save of the checkpoint
/// (a rebuild's swap, another instance) every account is looked up. The
/// plan holds only if none of the movements is listed yet; the caller
/// checks that as it writes.
pub async fn plan(
    conn: &mut PgConnection,
    memory: &LastEntries,
    from: LogPoint,
    written: DateTime<Utc>,
    movements: &[(&RecordedEvent, &TransferRecorded)],
) -> Result<Planned, sqlx::Error> {
    let known = memory.known_at(from, written);
    Ok(number(last_entries(conn, known, movements).await?, movements, known.is_some()))
}

/// The last (entry number, balance) of every account the movements touch:
/// from `known` (if any) where it holds the account, the others looked up in one
/// statement.
async fn last_entries(
    conn: &mut PgConnection,
    known: Option<&HashMap<Uuid, (i64, Decimal)>>,
    movements: &[(&RecordedEvent, &TransferRecorded)],
) -> Result<HashMap<Uuid, (i64, Decimal)>, sqlx::Error> {
    let mut last: HashMap<Uuid, (i64, Decimal)> = HashMap::with_capacity(movements.len() * 2);
    let mut unknown: Vec<Uuid> = Vec::new();
    for account in movements.iter().flat_map(|(_, t)| [t.from_account, t.to_account]) {
        if let std::collections::hash_map::Entry::Vacant(slot) = last.entry(account) {
            match known.and_then(|known| known.get(&account)) {
                Some(entry) => {
                    slot.insert(*entry);
                }
                None => unknown.push(account),
            }
        }
    }
    unknown.sort_unstable();
    unknown.dedup();
    if !unknown.is_empty() {
        last.extend(lookup_last(conn, &unknown).await?);
    }
    Ok(last)
}

/// Every movement's entries, numbered and balanced on from `last`, which
/// holds each account the movements touch.
fn number(
    mut last: HashMap<Uuid, (i64, Decimal)>,
    movements: &[(&RecordedEvent, &TransferRecorded)],
    trusted: bool,
) -> Planned {
    let mut entries = Vec::with_capacity(movements.len() * 2);
    for (recorded, t) in movements {
        entries.extend(next_entries(&mut last, recorded, t));
    }
    Planned { entries, last, trusted }
}

pub(crate) struct Entry {
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
