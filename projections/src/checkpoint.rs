//! Projection checkpoints: how far each read model has applied the log.

use chrono::{DateTime, Utc};
use ledger_commands::store::LogPoint;
use sqlx::{PgConnection, Row};

/// Reads a projection's checkpoint and locks it until the transaction ends,
/// so two projector instances never apply the same events concurrently.
pub async fn lock(conn: &mut PgConnection, projection: &str) -> Result<LogPoint, sqlx::Error> {
    // One statement: creates the row on first use, and the no-op update
    // takes the row lock either way.
    let row = sqlx::query(
        "INSERT INTO projection_checkpoints (projection, transaction_id, position)
         VALUES ($1, '0'::xid8, 0)
         ON CONFLICT (projection) DO UPDATE SET projection = excluded.projection
         RETURNING transaction_id::text AS t, position",
    )
    .bind(projection)
    .fetch_one(&mut *conn)
    .await?;
    point_from(&row)
}

pub async fn save(conn: &mut PgConnection, projection: &str, point: LogPoint) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints SET transaction_id = $2::text::xid8, position = $3, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(point.transaction_id.to_string())
    .bind(point.position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Several projections' checkpoints, locked (in name order, as two read
/// sides on two instances take them, so they never wait on each other in a
/// cycle) until the transaction ends; with each, the number of the log's
/// events after it up to `through`.
///
/// One statement. Its snapshot is taken before the locks, which is enough
/// for the count: everything up to `through` was settled (committed, with
/// nothing earlier still in flight) before the relay published it, so
/// before this statement began. The checkpoints themselves are read at
/// their latest committed values (`ON CONFLICT DO UPDATE` locks and reads
/// the newest version of each row).
pub async fn lock_counting(
    conn: &mut PgConnection,
    projections: &[&str],
    through: LogPoint,
) -> Result<Vec<Locked>, sqlx::Error> {
    let mut names: Vec<&str> = projections.to_vec();
    names.sort_unstable();
    names.dedup();
    let rows = sqlx::query(
        "WITH locked AS (
             INSERT INTO projection_checkpoints (projection, transaction_id, position)
             SELECT name, '0'::xid8, 0 FROM unnest($1::text[]) WITH ORDINALITY AS n(name, i) ORDER BY i
             ON CONFLICT (projection) DO UPDATE SET projection = excluded.projection
             RETURNING projection, transaction_id, position, updated_at)
         SELECT l.projection, l.transaction_id::text AS t, l.position, l.updated_at,
                (SELECT count(*) FROM events e
                 WHERE (e.transaction_id, e.position) > (l.transaction_id, l.position)
                   AND (e.transaction_id, e.position) <= ($2::text::xid8, $3)) AS in_log
         FROM locked l",
    )
    .bind(&names)
    .bind(through.transaction_id.to_string())
    .bind(through.position)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Locked {
                projection: r.try_get("projection")?,
                at: point_from(r)?,
                in_log: r.try_get("in_log")?,
                written: r.try_get("updated_at")?,
            })
        })
        .collect()
}

/// A checkpoint as `lock_counting` found it under its lock.
pub struct Locked {
    pub projection: String,
    pub at: LogPoint,
    /// The log's events after `at`, up to the batch's end.
    pub in_log: i64,
    /// When it was last saved (by anyone: a projector, a rebuild's swap).
    pub written: DateTime<Utc>,
}

/// Moves several projections' checkpoints, in one statement; returns when
/// each was saved (this transaction's start).
pub async fn save_all(
    conn: &mut PgConnection,
    points: &[(&str, LogPoint)],
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    if points.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "UPDATE projection_checkpoints c
         SET transaction_id = p.t::xid8, position = p.position, updated_at = now()
         FROM unnest($1::text[], $2::text[], $3::bigint[]) AS p(projection, t, position)
         WHERE c.projection = p.projection
         RETURNING c.projection, c.updated_at",
    )
    .bind(points.iter().map(|(name, _)| *name).collect::<Vec<_>>())
    .bind(points.iter().map(|(_, p)| p.transaction_id.to_string()).collect::<Vec<_>>())
    .bind(points.iter().map(|(_, p)| p.position).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
}

/// Every projection's checkpoint, without locking.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<(String, LogPoint)>, sqlx::Error> {
    let rows = sqlx::query("SELECT projection, transaction_id::text AS t, position FROM projection_checkpoints")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("projection")?, point_from(r)?))).collect()
}

fn point_from(row: &sqlx::postgres::PgRow) -> Result<LogPoint, sqlx::Error> {
    let t: String = row.try_get("t")?;
    Ok(LogPoint {
        transaction_id: t
            .parse()
            .map_err(|e| sqlx::Error::ColumnDecode { index: "transaction_id".into(), source: Box::new(e) })?,
        position: row.try_get("position")?,
    })
}
