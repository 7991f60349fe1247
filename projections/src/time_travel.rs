//! Balances in the past, computed from the log itself (so they agree with a
//! fold of it by construction), and statements for a period from the
//! statements read model.

use crate::statements::EntryView;
use chrono::{DateTime, Utc};
use ledger_commands::store::LogPoint;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

/// A point in the past: after a log position (in tailing order) or at a time.
#[derive(Clone, Copy, Debug)]
pub enum AsOf {
    Point(LogPoint),
    Time(DateTime<Utc>),
}

/// (balance, available) of an account as of a point in the log.
pub async fn balance_as_of(pool: &PgPool, account_id: Uuid, as_of: AsOf) -> Result<(Decimal, Decimal), sqlx::Error> {
    let (txid, position, time) = match as_of {
        AsOf::Point(p) => (Some(p.transaction_id.to_string()), Some(p.position), None),
        AsOf::Time(t) => (None, None, Some(t)),
    };
    const UPTO: &str = "(($2::text IS NOT NULL AND (e.transaction_id, e.position) <= ($2::text::xid8, $3))
                         OR ($4::timestamptz IS NOT NULL AND e.recorded_at <= $4))";
    let sql = format!(
        "SELECT
           coalesce((SELECT sum(CASE WHEN e.payload->>'to_account' = $1 THEN (e.payload->>'amount')::numeric ELSE 0 END
                              - CASE WHEN e.payload->>'from_account' = $1 THEN (e.payload->>'amount')::numeric ELSE 0 END)
                     FROM events e
                     WHERE e.event_type = 'TransferRecorded'
                       AND (e.payload->>'to_account' = $1 OR e.payload->>'from_account' = $1) AND {UPTO}), 0) AS balance,
           coalesce((SELECT sum((e.payload->>'amount')::numeric) FROM events e
                     WHERE e.event_type = 'HoldPlaced' AND e.payload->>'from_account' = $1 AND {UPTO}
                       AND NOT EXISTS (
                           SELECT 1 FROM events r
                           WHERE r.event_type IN ('HoldCaptured', 'HoldReleased', 'HoldExpired')
                             AND r.payload->>'hold_id' = e.payload->>'hold_id'
                             AND ((($2::text IS NOT NULL AND (r.transaction_id, r.position) <= ($2::text::xid8, $3))
                                  OR ($4::timestamptz IS NOT NULL AND r.recorded_at <= $4))))), 0) AS held"
    );
    let (balance, held): (Decimal, Decimal) =
        sqlx::query_as(&sql).bind(account_id.to_string()).bind(txid).bind(position).bind(time).fetch_one(pool).await?;
    Ok((balance, balance - held))
}

/// At most this many entries in one statement; a longer period is refused.
pub const MAX_STATEMENT_ENTRIES: i64 = 10_000;

/// A statement for `[from, to)`: the opening balance, the entries, the
/// closing balance. Membership is by `recorded_at`, and the opening and
/// closing balances are sums over the same predicate, so opening + entries =
/// closing always, whatever order concurrent movements committed in.
pub struct Statement {
    pub opening_balance: Decimal,
    pub entries: Vec<EntryView>,
    pub closing_balance: Decimal,
}

/// `None` when the period holds more than `MAX_STATEMENT_ENTRIES` entries.
pub async fn statement(
    pool: &PgPool,
    account_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Option<Statement>, sqlx::Error> {
    const SIGNED: &str = "CASE direction WHEN 'credit' THEN amount ELSE -amount END";
    let opening_balance: Decimal = sqlx::query_scalar(&format!(
        "SELECT coalesce(sum({SIGNED}), 0) FROM statement_entries
         WHERE account_id = $1 AND $2::timestamptz IS NOT NULL AND recorded_at < $2"
    ))
    .bind(account_id)
    .bind(from)
    .fetch_one(pool)
    .await?;
    let entries: Vec<EntryView> = sqlx::query_as(
        "SELECT entry_no, transfer_id, direction, amount, balance_after, counterparty_account, kind,
                reference, recorded_at, position
         FROM statement_entries
         WHERE account_id = $1 AND ($2::timestamptz IS NULL OR recorded_at >= $2) AND ($3::timestamptz IS NULL OR recorded_at < $3)
         ORDER BY recorded_at, entry_no LIMIT $4",
    )
    .bind(account_id)
    .bind(from)
    .bind(to)
    .bind(MAX_STATEMENT_ENTRIES + 1)
    .fetch_all(pool)
    .await?;
    if entries.len() as i64 > MAX_STATEMENT_ENTRIES {
        return Ok(None);
    }
    let moved: Decimal = entries.iter().map(|e| if e.direction == "credit" { e.amount } else { -e.amount }).sum();
    Ok(Some(Statement { opening_balance, closing_balance: opening_balance + moved, entries }))
}
