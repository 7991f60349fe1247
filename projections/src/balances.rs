//! The `balances` read model: one row per account with balance, available,
//! version (movements applied) and the last position that changed it.

use chrono::{DateTime, Utc};
use ledger_commands::store::RecordedEvent;
use ledger_domain::events::{AccountKind, HoldPlaced};
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

pub const TABLES: &[&str] = &["balances", "holds"];

/// Applies events in order. Runs of movements and hold events, whose effects
/// on balances commute, are applied in three statements: the new holds, the
/// resolved ones, and every account's summed change.
pub async fn apply_all(conn: &mut PgConnection, events: &[(&RecordedEvent, &Event)]) -> Result<(), sqlx::Error> {
    let mut run: Vec<(&RecordedEvent, &Event)> = Vec::new();
    for &(recorded, event) in events {
        if matches!(
            event,
            Event::TransferRecorded(_)
                | Event::HoldPlaced(_)
                | Event::HoldCaptured(_)
                | Event::HoldReleased(_)
                | Event::HoldExpired(_)
        ) {
            run.push((recorded, event));
            continue;
        }
        apply_run(conn, &run).await?;
        run.clear();
        apply(conn, recorded, event).await?;
    }
    apply_run(conn, &run).await
}

/// An account's summed change over a run.
#[derive(Default)]
struct Change {
    balance: Decimal,
    available: Decimal,
    movements: i64,
    /// (index in the run, position) of the last event that touched it.
    last: (usize, i64),
}

impl Change {
    fn touched(&mut self, index: usize, position: i64) {
        if index >= self.last.0 {
            self.last = (index, position);
        }
    }
}

/// The sum of what per-event application would do for a run of movements
/// and hold events: each movement moves both sides' balance and available
/// and counts one version; a placement takes the amount from available; a
/// resolution of a still-pending hold gives its whole amount back (a
/// capture's movement follows it); an account's last position is that of the
/// last event in the run that changed it.
async fn apply_run(conn: &mut PgConnection, run: &[(&RecordedEvent, &Event)]) -> Result<(), sqlx::Error> {
    if run.is_empty() {
        return Ok(());
    }
    let mut changes: HashMap<Uuid, Change> = HashMap::new();
    let mut placed: Vec<(&RecordedEvent, &HoldPlaced)> = Vec::new();
    // The first resolution of each hold in the run; a later one finds it
    // resolved and does nothing, as it would applied alone.
    let mut resolutions: Vec<(Uuid, &'static str, Decimal, &RecordedEvent)> = Vec::new();
    let mut resolving: HashSet<Uuid> = HashSet::new();
    let mut index_of: HashMap<i64, usize> = HashMap::new();
    for (index, &(recorded, event)) in run.iter().enumerate() {
        index_of.insert(recorded.position, index);
        match event {
            Event::TransferRecorded(t) => {
                for (account, delta) in [(t.from_account, -t.amount), (t.to_account, t.amount)] {
                    let change = changes.entry(account).or_default();
                    change.balance += delta;
                    change.available += delta;
                    change.movements += 1;
                    change.touched(index, recorded.position);
                }
            }
            Event::HoldPlaced(h) => {
                placed.push((recorded, h));
                let change = changes.entry(h.from_account).or_default();
                change.available -= h.amount;
                change.touched(index, recorded.position);
            }
            Event::HoldCaptured(h) if resolving.insert(h.hold_id) => {
                resolutions.push((h.hold_id, "captured", h.amount, recorded));
            }
            Event::HoldReleased(h) if resolving.insert(h.hold_id) => {
                resolutions.push((h.hold_id, "released", Decimal::ZERO, recorded));
            }
            Event::HoldExpired(h) if resolving.insert(h.hold_id) => {
                resolutions.push((h.hold_id, "expired", Decimal::ZERO, recorded));
            }
            _ => {}
        }
    }
    // A hold placed in this run and resolved in it too is inserted resolved:
    // the statement's update of pending holds does not see its own insert.
    let placed_here: HashMap<Uuid, usize> = placed.iter().enumerate().map(|(i, (_, h))| (h.hold_id, i)).collect();
    let mut status: Vec<&str> = vec!["pending"; placed.len()];
    let mut captured: Vec<Decimal> = vec![Decimal::ZERO; placed.len()];
    let mut resolved_at: Vec<Option<DateTime<Utc>>> = vec![None; placed.len()];
    let mut earlier: Vec<(Uuid, &'static str, Decimal, &RecordedEvent)> = Vec::new();
    for (hold_id, resolution, amount, recorded) in resolutions {
        let Some(&i) = placed_here.get(&hold_id) else {
            earlier.push((hold_id, resolution, amount, recorded));
            continue;
        };
        (status[i], captured[i], resolved_at[i]) = (resolution, amount, Some(recorded.metadata.recorded_at));
        // The whole hold comes back to available (a capture's movement follows it).
        let h = placed[i].1;
        let change = changes.entry(h.from_account).or_default();
        change.available += h.amount;
        change.touched(index_of.get(&recorded.position).copied().unwrap_or(0), recorded.position);
    }
    let (mut ids, mut balances, mut availables, mut counts, mut lasts, mut orders) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (id, change) in changes {
        ids.push(id);
        balances.push(change.balance);
        availables.push(change.available);
        counts.push(change.movements);
        lasts.push(change.last.1);
        orders.push(change.last.0 as i64);
    }
    if placed.is_empty() && earlier.is_empty() {
        // Movements only (most runs of `batch`, say): the summed changes
        // alone, with nothing of the holds' parts to plan or run.
        sqlx::query(
            "UPDATE balances SET balance = balance + d.balance_change, available = available + d.available_change,
                    version = version + d.n, last_position = d.last
             FROM unnest($1::uuid[], $2::numeric[], $3::numeric[], $4::bigint[], $5::bigint[])
                  AS d(account_id, balance_change, available_change, n, last)
             WHERE balances.account_id = d.account_id",
        )
        .bind(&ids)
        .bind(&balances)
        .bind(&availables)
        .bind(&counts)
        .bind(&lasts)
        .execute(&mut *conn)
        .await?;
        return Ok(());
    }
    // One statement: the earlier holds resolved (each gives its amount back
    // to available, at its resolution's place in the run), the new ones
    // inserted, and every account's summed change; an account's last
    // position is that of the last event in the run that changed it.
    sqlx::query(
        "WITH resolved AS (
             UPDATE holds h SET status = r.status, captured_amount = r.captured, resolved_at = r.resolved_at
             FROM unnest($1::uuid[], $2::text[], $3::numeric[], $4::timestamptz[], $5::bigint[], $6::bigint[])
                  AS r(hold_id, status, captured, resolved_at, position, ord)
             WHERE h.hold_id = r.hold_id AND h.status = 'pending'
             RETURNING h.from_account, h.amount, r.position, r.ord
         ), placed AS (
             INSERT INTO holds (hold_id, from_account, to_account, amount, currency, status, expires_at,
                                reference, order_id, placed_at, position, captured_amount, resolved_at)
             SELECT * FROM unnest($7::uuid[], $8::uuid[], $9::uuid[], $10::numeric[], $11::text[], $12::text[],
                                  $13::timestamptz[], $14::text[], $15::uuid[], $16::timestamptz[], $17::bigint[],
                                  $18::numeric[], $19::timestamptz[])
         ), changed AS (
             SELECT * FROM unnest($20::uuid[], $21::numeric[], $22::numeric[], $23::bigint[], $24::bigint[],
                                  $25::bigint[]) AS c(account_id, balance_change, available_change, n, last, ord)
             UNION ALL
             SELECT from_account, 0, amount, 0, position, ord FROM resolved
         ), summed AS (
             SELECT account_id, sum(balance_change) AS balance_change, sum(available_change) AS available_change,
                    sum(n)::bigint AS n, (array_agg(last ORDER BY ord DESC))[1] AS last
             FROM changed GROUP BY account_id
         )
         UPDATE balances SET balance = balance + s.balance_change, available = available + s.available_change,
                version = version + s.n, last_position = s.last
         FROM summed s
         WHERE balances.account_id = s.account_id",
    )
    .bind(earlier.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(earlier.iter().map(|r| r.1).collect::<Vec<_>>())
    .bind(earlier.iter().map(|r| r.2).collect::<Vec<_>>())
    .bind(earlier.iter().map(|r| r.3.metadata.recorded_at).collect::<Vec<_>>())
    .bind(earlier.iter().map(|r| r.3.position).collect::<Vec<_>>())
    .bind(earlier.iter().map(|r| index_of.get(&r.3.position).copied().unwrap_or(0) as i64).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.hold_id).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.from_account).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.to_account).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.amount).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.currency.clone()).collect::<Vec<_>>())
    .bind(&status)
    .bind(placed.iter().map(|(_, h)| h.expires_at).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.reference.clone()).collect::<Vec<_>>())
    .bind(placed.iter().map(|(_, h)| h.order_id).collect::<Vec<_>>())
    .bind(placed.iter().map(|(r, _)| r.metadata.recorded_at).collect::<Vec<_>>())
    .bind(placed.iter().map(|(r, _)| r.position).collect::<Vec<_>>())
    .bind(&captured)
    .bind(&resolved_at)
    .bind(&ids)
    .bind(&balances)
    .bind(&availables)
    .bind(&counts)
    .bind(&lasts)
    .bind(&orders)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    match event {
        Event::AccountOpened(a) => {
            sqlx::query(
                "INSERT INTO balances (account_id, owner_id, currency, kind, name, balance, available,
                                       version, last_position, opened_at)
                 VALUES ($1, $2, $3, $4, $5, 0, 0, 0, $6, $7)
                 ON CONFLICT (account_id) DO NOTHING",
            )
            .bind(a.account_id)
            .bind(a.owner_id)
            .bind(&a.currency)
            .bind(match a.kind {
                AccountKind::User => "user",
                AccountKind::System => "system",
            })
            .bind(&a.name)
            .bind(recorded.position)
            .bind(recorded.metadata.recorded_at)
            .execute(&mut *conn)
            .await?;
        }
        Event::TransferRecorded(t) => {
            sqlx::query(
                "UPDATE balances SET balance = balance + d.delta, available = available + d.delta,
                        version = version + 1, last_position = $4
                 FROM (VALUES ($1::uuid, -$3::numeric), ($2::uuid, $3::numeric)) AS d(account_id, delta)
                 WHERE balances.account_id = d.account_id",
            )
            .bind(t.from_account)
            .bind(t.to_account)
            .bind(t.amount)
            .bind(recorded.position)
            .execute(&mut *conn)
            .await?;
        }
        Event::HoldPlaced(h) => {
            sqlx::query(
                "INSERT INTO holds (hold_id, from_account, to_account, amount, currency, status, expires_at,
                                    reference, order_id, placed_at, position)
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10)",
            )
            .bind(h.hold_id)
            .bind(h.from_account)
            .bind(h.to_account)
            .bind(h.amount)
            .bind(&h.currency)
            .bind(h.expires_at)
            .bind(&h.reference)
            .bind(h.order_id)
            .bind(recorded.metadata.recorded_at)
            .bind(recorded.position)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE balances SET available = available - $2, last_position = $3 WHERE account_id = $1")
                .bind(h.from_account)
                .bind(h.amount)
                .bind(recorded.position)
                .execute(&mut *conn)
                .await?;
        }
        Event::HoldCaptured(h) => {
            resolve_hold(conn, h.hold_id, "captured", h.amount, recorded).await?;
        }
        Event::HoldReleased(h) => resolve_hold(conn, h.hold_id, "released", Decimal::ZERO, recorded).await?,
        Event::HoldExpired(h) => resolve_hold(conn, h.hold_id, "expired", Decimal::ZERO, recorded).await?,
        Event::AccountFrozen(f) => set_frozen(conn, f.account_id, true, recorded.position).await?,
        Event::AccountUnfrozen(f) => set_frozen(conn, f.account_id, false, recorded.position).await?,
        _ => {}
    }
    Ok(())
}

/// Ends a hold and gives its whole amount back to `available`; a capture's
/// movement (the `TransferRecorded` that follows) then takes the captured part.
async fn resolve_hold(
    conn: &mut PgConnection,
    hold_id: Uuid,
    status: &str,
    captured: Decimal,
    recorded: &RecordedEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH resolved AS (
             UPDATE holds SET status = $2, captured_amount = $3, resolved_at = $4
             WHERE hold_id = $1 AND status = 'pending'
             RETURNING from_account, amount)
         UPDATE balances b SET available = b.available + r.amount, last_position = $5
         FROM resolved r WHERE b.account_id = r.from_account",
    )
    .bind(hold_id)
    .bind(status)
    .bind(captured)
    .bind(recorded.metadata.recorded_at)
    .bind(recorded.position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct HoldView {
    pub hold_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Decimal,
    pub captured_amount: Decimal,
    pub currency: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub reference: Option<String>,
    pub order_id: Option<Uuid>,
    pub placed_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub position: i64,
}

const HOLD_COLUMNS: &str = "hold_id, from_account, to_account, amount, captured_amount, currency, status, expires_at,
     reference, order_id, placed_at, resolved_at, position";

pub async fn hold(pool: &PgPool, hold_id: Uuid) -> Result<Option<HoldView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE hold_id = $1"))
        .bind(hold_id)
        .fetch_optional(pool)
        .await
}

/// An account's holds, newest first, optionally of one status.
pub async fn holds_of(pool: &PgPool, account_id: Uuid, status: Option<&str>) -> Result<Vec<HoldView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {HOLD_COLUMNS} FROM holds WHERE (from_account = $1 OR to_account = $1)
           AND ($2::text IS NULL OR status = $2) ORDER BY position DESC LIMIT 500"
    ))
    .bind(account_id)
    .bind(status)
    .fetch_all(pool)
    .await
}

/// Pending holds past their expiry, for the scheduler, by the database's
/// clock: the one the hold deciders are given, so every instance agrees.
pub async fn due_holds(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT hold_id FROM holds WHERE status = 'pending' AND expires_at <= now() ORDER BY expires_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

async fn set_frozen(conn: &mut PgConnection, account_id: Uuid, frozen: bool, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE balances SET frozen = $2, last_position = $3 WHERE account_id = $1")
        .bind(account_id)
        .bind(frozen)
        .bind(position)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One account as the query API shows it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AccountView {
    pub account_id: Uuid,
    pub owner_id: Option<Uuid>,
    pub currency: String,
    pub kind: String,
    pub name: Option<String>,
    pub balance: Decimal,
    pub available: Decimal,
    pub version: i64,
    pub last_position: i64,
    pub opened_at: DateTime<Utc>,
    pub frozen: bool,
}

const COLUMNS: &str =
    "account_id, owner_id, currency, kind, name, balance, available, version, last_position, opened_at, frozen";

pub async fn account(pool: &PgPool, account_id: Uuid) -> Result<Option<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances WHERE account_id = $1"))
        .bind(account_id)
        .fetch_optional(pool)
        .await
}

pub async fn accounts_of(pool: &PgPool, owner_id: Uuid) -> Result<Vec<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances WHERE owner_id = $1 ORDER BY opened_at, account_id"))
        .bind(owner_id)
        .fetch_all(pool)
        .await
}

/// Every row, in a stable order, for consistency checks and replay comparisons.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances ORDER BY account_id")).fetch_all(&mut *conn).await
}
