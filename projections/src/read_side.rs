//! Read-your-writes: wait until every projection has applied a position.

use crate::{checkpoint, Projection};
use ledger_commands::store;
use ledger_commands::store::ReadSideProgress;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the read side has not applied position {0} yet")]
    Lag(i64),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] store::StoreError),
}

/// How far this instance's projector has applied the log: after each of its
/// commits every read model is at or past the point it publishes (a read
/// model it skipped was already past the batch's end).
pub type Applied = watch::Receiver<ReadSideProgress>;

/// Waits, up to `timeout`, until every projection has applied the event at
/// `position` (and so everything before it in tailing order).
pub async fn wait_for(pool: &PgPool, position: i64, timeout: Duration) -> Result<(), WaitError> {
    wait_for_applied(pool, position, timeout, None).await
}

/// As `wait_for`; with this instance's projector's progress, a wait ends as
/// soon as that projector commits past the position instead of at the next
/// poll of the checkpoints. The polls go on: another instance's projector
/// may be the one applying.
pub async fn wait_for_applied(
    pool: &PgPool,
    position: i64,
    timeout: Duration,
    applied: Option<&Applied>,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    // A connection is held only for each short check, never across a sleep:
    // many waiting readers must not starve commands and projectors of the pool.
    let target = loop {
        let found = {
            let mut conn = pool.acquire().await?;
            store::point_of(&mut conn, position).await?
        };
        if let Some(point) = found {
            break point;
        }
        if Instant::now() + pause > deadline {
            return Err(WaitError::Lag(position));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    let mut applied = applied.cloned();
    loop {
        if applied.as_ref().is_some_and(|a| a.borrow().through >= target) {
            return Ok(());
        }
        let checkpoints = {
            let mut conn = pool.acquire().await?;
            checkpoint::all(&mut conn).await?
        };
        let caught_up = Projection::ALL
            .iter()
            .all(|p| checkpoints.iter().any(|(name, point)| name == p.name() && *point >= target));
        if caught_up {
            return Ok(());
        }
        if Instant::now() + pause > deadline {
            return Err(WaitError::Lag(position));
        }
        let mut projector_gone = false;
        match applied.as_mut() {
            Some(local) => {
                tokio::select! {
                    reached = local.wait_for(|progress| progress.through >= target) => match reached {
                        Ok(_) => return Ok(()),
                        Err(_) => projector_gone = true,
                    },
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            None => tokio::time::sleep(pause).await,
        }
        if projector_gone {
            // Its task ended: polls only from now on.
            applied = None;
            tokio::time::sleep(pause).await;
        }
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Events each projection still has to apply (capped), for `/readyz`.
pub async fn lags(pool: &PgPool) -> Result<Vec<(&'static str, i64)>, WaitError> {
    let mut conn = pool.acquire().await?;
    let checkpoints = checkpoint::all(&mut conn).await?;
    let mut out = Vec::new();
    for p in Projection::ALL {
        let at = checkpoints.iter().find(|(n, _)| n == p.name()).map(|(_, point)| *point).unwrap_or_default();
        out.push((p.name(), store::count_after(&mut conn, at, 1_000_000).await?));
    }
    Ok(out)
}
