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

use crate::{checkpoint, statements, Projection, ProjectionError};
use ledger_commands::store::{self, LogPoint, RecordedEvent};
use ledger_domain::Event;
use sqlx::{Acquire, PgConnection, PgPool};
use std::sync::Arc;
use tokio::sync::mpsc;

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
/// (interrupted) build first instead of resuming it. `bulk` creates the
/// projection's bulk tables without indexes: `create_deferred_indexes` adds
/// them after the load.
async fn prepare(
    pool: &PgPool,
    projection: Projection,
    schema: &str,
    fresh: bool,
    bulk: bool,
) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    if fresh {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *tx).await?;
    }
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&mut *tx).await?;
    for table in projection.tables().iter().chain(["projection_checkpoints"].iter()) {
        let indexes = if bulk && projection.bulk_tables().contains(table) { " EXCLUDING INDEXES" } else { "" };
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} (LIKE public.{table} INCLUDING ALL{indexes})"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Gives bulk-loaded shadow tables the live tables' constraints and indexes,
/// table by table in parallel (each table's in one transaction, so a table
/// has either none or all).
async fn create_deferred_indexes(pool: &PgPool, projection: Projection, schema: &str) -> Result<(), ProjectionError> {
    let builds = projection.bulk_tables().iter().map(|table| {
        let pool = pool.clone();
        let (shadow, live) = (format!("{schema}.{table}"), format!("public.{table}"));
        tokio::spawn(async move { index_like(&pool, &shadow, &live).await })
    });
    // Every build is awaited (none is left running) before the first error is returned.
    let mut first_error = None;
    for build in builds.collect::<Vec<_>>() {
        let result = build.await.map_err(ProjectionError::from).and_then(|r| r);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Creates on `shadow` the constraints and indexes `live` has, unless it has some.
async fn index_like(pool: &PgPool, shadow: &str, live: &str) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    let indexed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::regclass)")
        .bind(shadow)
        .fetch_one(&mut *tx)
        .await?;
    if indexed {
        return Ok(());
    }
    // Index builds sort in memory rather than in temporary files.
    sqlx::query("SET LOCAL maintenance_work_mem = '512MB'").execute(&mut *tx).await?;
    let constraints: Vec<(String, String)> = sqlx::query_as(
        "SELECT quote_ident(conname), pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
    )
    .bind(live)
    .fetch_all(&mut *tx)
    .await?;
    for (name, definition) in constraints {
        sqlx::query(&format!("ALTER TABLE {shadow} ADD CONSTRAINT {name} {definition}")).execute(&mut *tx).await?;
    }
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
         WHERE i.indrelid = $1::regclass
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
         ORDER BY i.indexrelid",
    )
    .bind(live)
    .fetch_all(&mut *tx)
    .await?;
    let on_live = format!(" ON {live} ");
    for definition in indexes {
        if !definition.contains(&on_live) {
            return Err(ProjectionError::Rebuild(format!("cannot place index {definition:?} on {shadow}")));
        }
        sqlx::query(&definition.replacen(&on_live, &format!(" ON {shadow} "), 1)).execute(&mut *tx).await?;
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

/// Events at or below `at`: what a resumed rebuild has done.
async fn events_through(pool: &PgPool, at: LogPoint) -> Result<u64, ProjectionError> {
    if at == LogPoint::START {
        return Ok(0);
    }
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE (transaction_id, position) <= ($1::text::xid8, $2)")
            .bind(at.transaction_id.to_string())
            .bind(at.position)
            .fetch_one(pool)
            .await?;
    Ok(n.max(0) as u64)
}

/// The shadow tables' checkpoint.
async fn shadow_checkpoint(pool: &PgPool, projection: Projection, schema: &str) -> Result<LogPoint, ProjectionError> {
    let mut tx = pool.begin().await?;
    use_shadow(&mut tx, schema).await?;
    let at = checkpoint::lock(&mut tx, projection.name()).await?;
    tx.rollback().await?;
    Ok(at)
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
    Ok(rebuild_all(pool, &[projection], fresh, progress).await?.into_iter().map(|(_, n)| n).sum())
}

/// Rebuilds `projections` blue/green in one pass over the log and swaps each
/// in; resumes interrupted rebuilds unless `fresh`. Returns the events each
/// projection applied in this run. Progress counts events read from the log.
pub async fn rebuild_all(
    pool: &PgPool,
    projections: &[Projection],
    fresh: bool,
    progress: Progress<'_>,
) -> Result<Vec<(Projection, u64)>, ProjectionError> {
    rebuild_all_in_pages(pool, projections, fresh, REPLAY_PAGE, progress).await
}

/// `rebuild_all`, reading the log `page` events at a time.
pub async fn rebuild_all_in_pages(
    pool: &PgPool,
    projections: &[Projection],
    fresh: bool,
    page: i64,
    progress: Progress<'_>,
) -> Result<Vec<(Projection, u64)>, ProjectionError> {
    let locks = exclusive_all(pool, projections).await?;
    let result = async {
        let applied = build_all(pool, projections, fresh, None, page.max(1), progress).await?;
        let started = std::time::Instant::now();
        for &projection in projections {
            swap_in(pool, projection).await?;
        }
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "swapped in");
        Ok(applied)
    }
    .await;
    for lock in locks {
        lock.release().await;
    }
    result
}

async fn exclusive_all(pool: &PgPool, projections: &[Projection]) -> Result<Vec<Exclusive>, ProjectionError> {
    let mut locks = Vec::with_capacity(projections.len());
    for &projection in projections {
        match exclusive(pool, projection).await {
            Ok(lock) => locks.push(lock),
            Err(e) => {
                for lock in locks {
                    lock.release().await;
                }
                return Err(e);
            }
        }
    }
    Ok(locks)
}

/// Events read from the log in one page, decoded once for every projection.
type Page = Arc<Vec<(RecordedEvent, Event)>>;

/// Replay reads the log in pages of this many events.
const REPLAY_PAGE: i64 = 20_000;

/// Builds the shadow tables of `projections` (up to `until`, if given) in one
/// pass over the settled log: one task reads and decodes each page once, and
/// every projection applies it in a task and a connection of its own, each
/// page in one transaction with the projection's shadow checkpoint. Bulk
/// tables get their indexes at the end.
async fn build_all(
    pool: &PgPool,
    projections: &[Projection],
    fresh: bool,
    until: Option<LogPoint>,
    page: i64,
    progress: Progress<'_>,
) -> Result<Vec<(Projection, u64)>, ProjectionError> {
    let mut from: Option<LogPoint> = None;
    for &projection in projections {
        let schema = shadow_schema(projection);
        prepare(pool, projection, &schema, fresh, true).await?;
        let at = shadow_checkpoint(pool, projection, &schema).await?;
        from = Some(from.map_or(at, |f| f.min(at)));
    }
    let from = from.unwrap_or(LogPoint::START);
    let total = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(pool).await?.max(0) as u64;
    // A resumed rebuild starts its progress where the interrupted one stopped.
    let done_before = events_through(pool, from).await?;
    let mut senders = Vec::with_capacity(projections.len());
    let mut builders = Vec::with_capacity(projections.len());
    for &projection in projections {
        let (sender, pages) = mpsc::channel::<Page>(2);
        senders.push(sender);
        builders.push(tokio::spawn(build_shadow(pool.clone(), projection, pages)));
    }
    let read = read_log(pool, from, until, page, &senders, &mut |read| {
        progress(done_before + read, total.max(done_before + read))
    })
    .await;
    drop(senders);
    let mut applied = Vec::with_capacity(projections.len());
    let mut failure = None;
    for (&projection, builder) in projections.iter().zip(builders) {
        match builder.await {
            Ok(Ok(n)) => applied.push((projection, n)),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(ProjectionError::Task(e));
            }
        }
    }
    // A builder's own error explains a failed read (its channel closed).
    match (failure, read) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(applied),
    }
}

/// The reading side of `build_all`: settled events after `from`, page by
/// page, decoded and sent to every builder (a full channel holds the reader
/// back). Fetching the next page overlaps decoding this one.
async fn read_log(
    pool: &PgPool,
    from: LogPoint,
    until: Option<LogPoint>,
    page: i64,
    builders: &[mpsc::Sender<Page>],
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ProjectionError> {
    let (fetched, mut pages) = mpsc::channel::<Vec<RecordedEvent>>(2);
    let fetcher = tokio::spawn(fetch_log(pool.clone(), from, until, page, fetched));
    let mut read = 0u64;
    let decoded = async {
        while let Some(events) = pages.recv().await {
            read += events.len() as u64;
            let page = events
                .into_iter()
                .map(|r| match r.decode() {
                    Ok(e) => Ok((r, e)),
                    Err(source) => Err(ProjectionError::Decode { position: r.position, source }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let page: Page = Arc::new(page);
            for builder in builders {
                if builder.send(page.clone()).await.is_err() {
                    return Err(ProjectionError::Rebuild("a projection stopped building".into()));
                }
            }
            progress(read);
        }
        Ok(())
    }
    .await;
    drop(pages);
    let fetch = fetcher.await?;
    decoded.and(fetch)
}

/// Reads settled events after `from` (through `until`) in pages.
async fn fetch_log(
    pool: PgPool,
    from: LogPoint,
    until: Option<LogPoint>,
    page: i64,
    pages: mpsc::Sender<Vec<RecordedEvent>>,
) -> Result<(), ProjectionError> {
    let mut conn = pool.acquire().await?;
    let mut at = from;
    loop {
        let mut tx = conn.begin().await?;
        for (name, value) in store::TAILING_SETTINGS {
            sqlx::query("SELECT set_config($1, $2, true)").bind(name).bind(value).execute(&mut *tx).await?;
        }
        let mut events = store::read_settled_after(&mut tx, at, page).await?;
        tx.commit().await?;
        let fetched = events.len();
        if let Some(limit) = until {
            events.retain(|e| e.point() <= limit);
        }
        let more = fetched as i64 == page && events.len() == fetched;
        let Some(last) = events.last().map(RecordedEvent::point) else { return Ok(()) };
        at = last;
        if pages.send(events).await.is_err() {
            // The decoding side stopped; it reports why.
            return Ok(());
        }
        if !more {
            return Ok(());
        }
    }
}

/// One projection's side of `build_all`: applies the pages, then creates
/// the bulk tables' indexes.
async fn build_shadow(
    pool: PgPool,
    projection: Projection,
    pages: mpsc::Receiver<Page>,
) -> Result<u64, ProjectionError> {
    let started = std::time::Instant::now();
    let schema = shadow_schema(projection);
    let applied = {
        let mut conn = pool.acquire().await?;
        match projection {
            Projection::Statements => build_statements(&mut conn, &schema, pages).await?,
            _ => build_applying(&mut conn, projection, &schema, pages).await?,
        }
    };
    let loaded = started.elapsed();
    create_deferred_indexes(&pool, projection, &schema).await?;
    tracing::info!(
        projection = projection.name(),
        events = applied,
        applied_seconds = loaded.as_secs_f64(),
        indexed_seconds = (started.elapsed() - loaded).as_secs_f64(),
        "shadow tables built"
    );
    Ok(applied)
}

/// A transaction on the shadow tables. Derived data, committed with its
/// checkpoint: a crash loses both together and the build resumes from the
/// older checkpoint, so it need not wait for the flush.
async fn shadow_transaction<'c>(
    conn: &'c mut PgConnection,
    schema: &str,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, ProjectionError> {
    let mut tx = conn.begin().await?;
    use_shadow(&mut tx, schema).await?;
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    Ok(tx)
}

/// Applies each page with the projection's own `apply_decoded`.
async fn build_applying(
    conn: &mut PgConnection,
    projection: Projection,
    schema: &str,
    mut pages: mpsc::Receiver<Page>,
) -> Result<u64, ProjectionError> {
    let mut applied = 0;
    while let Some(page) = pages.recv().await {
        let mut tx = shadow_transaction(conn, schema).await?;
        let at = checkpoint::lock(&mut tx, projection.name()).await?;
        let events: Vec<(&RecordedEvent, &Event)> =
            page.iter().filter(|(r, _)| r.point() > at).map(|(r, e)| (r, e)).collect();
        let Some(last) = events.last().map(|(r, _)| r.point()) else {
            tx.rollback().await?;
            continue;
        };
        projection.apply_decoded(&mut tx, &events).await?;
        checkpoint::save(&mut tx, projection.name(), last).await?;
        tx.commit().await?;
        applied += events.len() as u64;
    }
    Ok(applied)
}

/// `statements` in bulk (see `statements::Bulk`): one task encodes the next
/// page's rows while this one's are copied in.
async fn build_statements(
    conn: &mut PgConnection,
    schema: &str,
    mut pages: mpsc::Receiver<Page>,
) -> Result<u64, ProjectionError> {
    let name = Projection::Statements.name();
    let (mut bulk, from) = {
        let mut tx = shadow_transaction(conn, schema).await?;
        let bulk = statements::Bulk::resume(&mut tx).await?;
        let at = checkpoint::lock(&mut tx, name).await?;
        tx.commit().await?;
        (bulk, at)
    };
    let (encoded, mut rows) = mpsc::channel::<(statements::BulkRows, LogPoint, u64)>(1);
    // The rebuild lock keeps every other writer off these tables: the
    // checkpoint can be followed in memory.
    let encoder = tokio::spawn(async move {
        let mut at = from;
        while let Some(page) = pages.recv().await {
            let events: Vec<(&RecordedEvent, &Event)> =
                page.iter().filter(|(r, _)| r.point() > at).map(|(r, e)| (r, e)).collect();
            let Some(last) = events.last().map(|(r, _)| r.point()) else { continue };
            let page_rows = bulk.encode(&events)?;
            at = last;
            if encoded.send((page_rows, last, events.len() as u64)).await.is_err() {
                break;
            }
        }
        Ok::<_, ProjectionError>(())
    });
    let mut applied = 0;
    while let Some((page_rows, last, n)) = rows.recv().await {
        let mut tx = shadow_transaction(conn, schema).await?;
        page_rows.send(&mut tx).await?;
        checkpoint::save(&mut tx, name, last).await?;
        tx.commit().await?;
        applied += n;
    }
    encoder.await??;
    Ok(applied)
}

/// Brings the shadow tables to the live checkpoint (or the settled head)
/// and swaps them in, in one transaction.
async fn swap_in(pool: &PgPool, projection: Projection) -> Result<(), ProjectionError> {
    let schema = shadow_schema(projection);
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
    Ok(())
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
    prepare(pool, projection, &schema, true, false).await?;
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
pub async fn build_until(
    pool: &PgPool,
    projection: Projection,
    until: LogPoint,
    page: i64,
) -> Result<u64, ProjectionError> {
    let lock = exclusive(pool, projection).await?;
    let result = build_all(pool, &[projection], true, Some(until), page.max(1), &mut |_, _| {}).await;
    lock.release().await;
    Ok(result?.into_iter().map(|(_, n)| n).sum())
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

/// Rebuilds the outdated projections in the background of `ledger serve`, in
/// one pass over the log; the old tables serve until each swap. One instance
/// does it: the others find the rebuild locks taken and leave it.
pub async fn upgrade(pool: PgPool) -> Result<(), ProjectionError> {
    let mut projections = Vec::new();
    for projection in Projection::ALL {
        if outdated(&pool, projection).await? {
            projections.push(projection);
        }
    }
    if projections.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    tracing::info!(projections = names.join(","), "rebuilding projections for their new versions");
    let applied = match rebuild_all(&pool, &projections, false, &mut |_, _| {}).await {
        Err(ProjectionError::Busy(_)) => return Ok(()),
        other => other?,
    };
    for (projection, events) in applied {
        sqlx::query("UPDATE projection_versions SET version = $2, updated_at = now() WHERE projection = $1")
            .bind(projection.name())
            .bind(projection.version())
            .execute(&pool)
            .await?;
        tracing::info!(projection = projection.name(), events, "projection rebuilt and swapped in");
    }
    Ok(())
}
