//! Blue/green rebuilds: a projection is rebuilt into shadow tables while the
//! live ones keep serving, caught up to the head of the log, then swapped in
//! atomically.
//!
//! The shadow tables live in a schema of their own (`rebuild_{projection}`)
//! with the live tables' names, so the projection's own code writes into
//! them unchanged: each page runs with `SET LOCAL search_path` pointing at the
//! shadow schema first (the log itself, `events`, is found in `public`). The
//! shadow schema also holds its own checkpoint, committed with every page, so
//! an interrupted rebuild resumes where it stopped.
//!
//! The swap takes the live checkpoint's row lock (the live projector waits
//! on it), applies the last events, moves the live tables out and the shadow
//! tables in, and moves the checkpoint, in one transaction.

use crate::{checkpoint, Projection, ProjectionError};
use ledger_commands::store::{self, LogPoint};
use sqlx::{PgConnection, PgPool};

const PAGE: i64 = 2_000;

fn shadow_schema(projection: Projection) -> String {
    format!("rebuild_{}", projection.name())
}

fn compare_schema(projection: Projection) -> String {
    format!("compare_{}", projection.name())
}

fn retired_schema(projection: Projection) -> String {
    format!("retired_{}", projection.name())
}

/// Progress of a rebuild: events applied so far, and the log's size.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// What a comparison found: rows only in the rebuilt tables, rows only in
/// the live ones (each as JSON), per table.
#[derive(Debug, Default)]
pub struct Differences {
    pub tables: Vec<(String, Vec<String>, Vec<String>)>,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|(_, a, b)| a.is_empty() && b.is_empty())
    }
}

/// One rebuild or comparison of a projection at a time, across processes
/// (the CLI, a background upgrade): a session lock held for the duration.
struct Exclusive(sqlx::pool::PoolConnection<sqlx::Postgres>);

async fn exclusive(pool: &PgPool, projection: Projection) -> Result<Exclusive, ProjectionError> {
    let mut conn = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("projection rebuild {}", projection.name()))
        .fetch_one(&mut *conn)
        .await?;
    if !got {
        return Err(ProjectionError::Busy(format!("another rebuild of {} is running", projection.name())));
    }
    Ok(Exclusive(conn))
}

impl Exclusive {
    async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *self.0).await;
    }
}

/// Creates the shadow schema and tables if missing. `fresh` drops a previous
/// (interrupted) build first instead of resuming it.
async fn prepare(pool: &PgPool, projection: Projection, schema: &str, fresh: bool) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    if fresh {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *tx).await?;
    }
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&mut *tx).await?;
    for table in projection.tables().iter().chain(["projection_checkpoints"].iter()) {
        sqlx::query(&format!("CREATE TABLE IF NOT EXISTS {schema}.{table} (LIKE public.{table} INCLUDING ALL)"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn use_shadow(conn: &mut PgConnection, schema: &str) -> Result<(), ProjectionError> {
    for (name, value) in store::TAILING_SETTINGS {
        sqlx::query("SELECT set_config($1, $2, true)").bind(name).bind(value).execute(&mut *conn).await?;
    }
    sqlx::query(&format!("SET LOCAL search_path TO {schema}, public")).execute(&mut *conn).await?;
    Ok(())
}

/// Applies events after the shadow checkpoint, up to `until` if given, one
/// page per transaction.
async fn build(
    pool: &PgPool,
    projection: Projection,
    schema: &str,
    until: Option<LogPoint>,
    applied: &mut u64,
    total: u64,
    progress: Progress<'_>,
) -> Result<(), ProjectionError> {
    loop {
        let mut tx = pool.begin().await?;
        use_shadow(&mut tx, schema).await?;
        let at = checkpoint::lock(&mut tx, projection.name()).await?;
        let mut events = store::read_settled_after(&mut tx, at, PAGE).await?;
        if let Some(limit) = until {
            events.retain(|e| e.point() <= limit);
        }
        let Some(last) = events.last().map(|e| e.point()) else {
            tx.rollback().await?;
            return Ok(());
        };
        projection.apply_all(&mut tx, &events).await?;
        checkpoint::save(&mut tx, projection.name(), last).await?;
        tx.commit().await?;
        *applied += events.len() as u64;
        progress(*applied, total.max(*applied));
        if (events.len() as i64) < PAGE && until.is_none() {
            return Ok(());
        }
    }
}

/// Events at or below the shadow checkpoint: what a resumed rebuild has done.
async fn already_built(pool: &PgPool, projection: Projection, schema: &str) -> Result<u64, ProjectionError> {
    let mut tx = pool.begin().await?;
    use_shadow(&mut tx, schema).await?;
    let at = checkpoint::lock(&mut tx, projection.name()).await?;
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE (transaction_id, position) <= ($1::text::xid8, $2)")
            .bind(at.transaction_id.to_string())
            .bind(at.position)
            .fetch_one(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(n.max(0) as u64)
}

/// Inside `tx` (which holds the live checkpoint's lock): applies what the
/// shadow still lacks up to `target`.
async fn finish(
    tx: &mut PgConnection,
    projection: Projection,
    schema: &str,
    target: LogPoint,
) -> Result<LogPoint, ProjectionError> {
    use_shadow(tx, schema).await?;
    let mut at = checkpoint::lock(tx, projection.name()).await?;
    while at < target {
        let events = store::read_range(tx, at, target).await?;
        let Some(last) = events.last().map(|e| e.point()) else { break };
        projection.apply_all(tx, &events).await?;
        at = last;
    }
    checkpoint::save(tx, projection.name(), at).await?;
    sqlx::query("SET LOCAL search_path TO public").execute(&mut *tx).await?;
    Ok(at)
}

/// The live checkpoint, locked until the transaction ends; or, when the live
/// projection is behind the settled log, the settled head (so the swap
/// brings it forward).
async fn swap_target(tx: &mut PgConnection, projection: Projection) -> Result<LogPoint, ProjectionError> {
    let live = checkpoint::lock(tx, projection.name()).await?;
    let head: Option<(String, i64)> = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let head = head
        .and_then(|(t, p)| t.parse().ok().map(|transaction_id| LogPoint { transaction_id, position: p }))
        .unwrap_or(LogPoint::START);
    Ok(live.max(head))
}

/// Rebuilds `projection` blue/green and swaps it in; resumes an interrupted
/// rebuild unless `fresh`. Returns the events applied by this run.
pub async fn rebuild(
    pool: &PgPool,
    projection: Projection,
    fresh: bool,
    progress: Progress<'_>,
) -> Result<u64, ProjectionError> {
    let lock = exclusive(pool, projection).await?;
    let result = rebuild_locked(pool, projection, fresh, progress).await;
    lock.release().await;
    result
}

async fn rebuild_locked(
    pool: &PgPool,
    projection: Projection,
    fresh: bool,
    progress: Progress<'_>,
) -> Result<u64, ProjectionError> {
    let schema = shadow_schema(projection);
    prepare(pool, projection, &schema, fresh).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
    // A resumed rebuild starts its progress where the interrupted one stopped.
    let done_before = already_built(pool, projection, &schema).await?;
    let mut applied = 0;
    let mut shifted = |done: u64, total: u64| progress(done + done_before, total.max(done + done_before));
    build(pool, projection, &schema, None, &mut applied, total as u64, &mut shifted).await?;
    let retired = retired_schema(projection);
    let mut tx = pool.begin().await?;
    // Readers wait at most this long for the swap's table locks; the swap retries later.
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
    let target = swap_target(&mut tx, projection).await?;
    let reached = finish(&mut tx, projection, &schema, target).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {retired} CASCADE")).execute(&mut *tx).await?;
    sqlx::query(&format!("CREATE SCHEMA {retired}")).execute(&mut *tx).await?;
    for table in projection.tables() {
        sqlx::query(&format!("ALTER TABLE public.{table} SET SCHEMA {retired}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public")).execute(&mut *tx).await?;
    }
    checkpoint::save(&mut tx, projection.name(), reached).await?;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut *tx).await?;
    sqlx::query(&format!("DROP SCHEMA {retired} CASCADE")).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(applied)
}

/// Rebuilds into tables of its own up to the live checkpoint and reports
/// every row that differs from the live read model, without swapping.
pub async fn compare(
    pool: &PgPool,
    projection: Projection,
    progress: Progress<'_>,
) -> Result<Differences, ProjectionError> {
    let lock = exclusive(pool, projection).await?;
    let result = compare_locked(pool, projection, progress).await;
    lock.release().await;
    result
}

async fn compare_locked(
    pool: &PgPool,
    projection: Projection,
    progress: Progress<'_>,
) -> Result<Differences, ProjectionError> {
    // A schema of its own: an interrupted rebuild's progress is left alone.
    let schema = compare_schema(projection);
    prepare(pool, projection, &schema, true).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
    let mut applied = 0;
    let live = {
        let mut conn = pool.acquire().await?;
        checkpoint::all(&mut conn).await?.into_iter().find(|(n, _)| n == projection.name()).map(|(_, p)| p)
    }
    .unwrap_or(LogPoint::START);
    build(pool, projection, &schema, Some(live), &mut applied, total as u64, progress).await?;
    let mut tx = pool.begin().await?;
    // Hold the live projection still at its checkpoint while comparing.
    let live = checkpoint::lock(&mut tx, projection.name()).await?;
    finish(&mut tx, projection, &schema, live).await?;
    let mut differences = Differences::default();
    for table in projection.tables() {
        let rows = |a: &str, b: &str| {
            format!(
                "SELECT row_to_json(r)::text FROM (SELECT * FROM {a}.{table} EXCEPT ALL SELECT * FROM {b}.{table}) r LIMIT 50"
            )
        };
        let only_rebuilt: Vec<String> = sqlx::query_scalar(&rows(&schema, "public")).fetch_all(&mut *tx).await?;
        let only_live: Vec<String> = sqlx::query_scalar(&rows("public", &schema)).fetch_all(&mut *tx).await?;
        differences.tables.push(((*table).to_owned(), only_rebuilt, only_live));
    }
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(differences)
}

/// Builds the shadow tables up to `until` and stops, as an interrupted
/// rebuild would; `rebuild` resumes from there.
pub async fn build_until(pool: &PgPool, projection: Projection, until: LogPoint) -> Result<u64, ProjectionError> {
    let lock = exclusive(pool, projection).await?;
    let schema = shadow_schema(projection);
    let result = async {
        prepare(pool, projection, &schema, true).await?;
        let mut applied = 0;
        build(pool, projection, &schema, Some(until), &mut applied, 0, &mut |_, _| {}).await?;
        Ok(applied)
    }
    .await;
    lock.release().await;
    result
}

/// Whether the tables were built by an older version of the projection's
/// code. A projection seen for the first time is recorded as current.
pub async fn outdated(pool: &PgPool, projection: Projection) -> Result<bool, ProjectionError> {
    sqlx::query("INSERT INTO projection_versions (projection, version) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(projection.name())
        .bind(projection.version())
        .execute(pool)
        .await?;
    let stored: i32 = sqlx::query_scalar("SELECT version FROM projection_versions WHERE projection = $1")
        .bind(projection.name())
        .fetch_one(pool)
        .await?;
    Ok(stored < projection.version())
}

/// Rebuilds an outdated projection in the background of `ledger serve`; the
/// old tables serve until the swap. One instance does it: the others find
/// the rebuild lock taken and leave it.
pub async fn upgrade(pool: PgPool, projection: Projection) -> Result<(), ProjectionError> {
    if !outdated(&pool, projection).await? {
        return Ok(());
    }
    tracing::info!(
        projection = projection.name(),
        version = projection.version(),
        "rebuilding a projection for its new version"
    );
    let applied = match rebuild(&pool, projection, false, &mut |_, _| {}).await {
        Err(ProjectionError::Busy(_)) => return Ok(()),
        other => other?,
    };
    sqlx::query("UPDATE projection_versions SET version = $2, updated_at = now() WHERE projection = $1")
        .bind(projection.name())
        .bind(projection.version())
        .execute(&pool)
        .await?;
    tracing::info!(projection = projection.name(), events = applied, "projection rebuilt and swapped in");
    Ok(())
}
