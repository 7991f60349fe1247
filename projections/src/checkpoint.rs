//! Projection checkpoints: how far each read model has applied the log.

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
