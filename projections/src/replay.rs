//! Rebuilds a read model from the event log, in one transaction: readers see
//! the old rows until the rebuilt ones commit, and the live projector waits
//! on the checkpoint lock, then continues from the rebuilt checkpoint.

use crate::{checkpoint, Projection, ProjectionError};
use ledger_commands::store::{self, LogPoint};
use sqlx::PgPool;

const PAGE: i64 = 2_000;

/// Rebuilds `projection`; `progress(applied, total)` is called after every page.
pub async fn replay(
    pool: &PgPool,
    projection: Projection,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, ProjectionError> {
    let mut tx = pool.begin().await?;
    checkpoint::lock(&mut tx, projection.name()).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut *tx).await?;
    for table in projection.tables() {
        // DELETE, not TRUNCATE: readers keep the old rows until commit.
        sqlx::query(&format!("DELETE FROM {table}")).execute(&mut *tx).await?;
    }
    let mut at = LogPoint::START;
    let mut applied = 0u64;
    progress(0, total as u64);
    loop {
        let events = store::read_settled_after(&mut tx, at, PAGE).await?;
        let Some(last) = events.last().map(|e| e.point()) else {
            break;
        };
        for event in &events {
            projection.apply(&mut tx, event).await?;
        }
        applied += events.len() as u64;
        at = last;
        progress(applied, total.max(applied as i64) as u64);
    }
    checkpoint::save(&mut tx, projection.name(), at).await?;
    tx.commit().await?;
    Ok(applied)
}
