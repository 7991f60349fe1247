//! Connecting to PostgreSQL: create the database if missing, apply migrations.

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;
use std::time::Duration;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Creates the database named in `url` when it does not exist yet.
pub async fn create_database_if_missing(url: &str) -> Result<(), sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        match Postgres::create_database(url).await {
            Ok(()) => tracing::info!("created the database"),
            // Another instance created it between the check and now.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    create_database_if_missing(url).await?;
    connect_existing(url, max_connections).await
}

/// `connect` to a database known to exist (a second pool of one process).
pub async fn connect_existing(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    // Short OLTP statements only: JIT compilation would cost more than it saves.
    let options = PgConnectOptions::from_str(url)?.application_name("ledger").options([("jit", "off")]);
    pool_options(max_connections).connect_with(options).await
}

/// The pool settings both pools share. sqlx pings a connection before it
/// hands it out (and again when it comes back): a round trip per acquire,
/// which is why the hot paths acquire once per group or batch. The ping is
/// kept: it replaces a connection that died while idle (a database restart,
/// a dropped TCP connection) within the acquire timeout, where a command
/// would otherwise fail on it or hang until TCP gives up (tested by
/// `connections_that_died_while_idle_are_replaced_before_use`). A ping only
/// for long-idle connections would almost never run: the pool reuses its
/// connections in rotation. The two hottest loops, the group-commit writer
/// and the projector, keep a connection of their own instead, pinged after
/// a second unused and with time limits (`group_commit::HeldConnection`).
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10))
}

/// A pool for the read side (projectors, the relay's checkpoint): its
/// transactions commit without waiting for the WAL flush. What they write is
/// derived from the log and committed atomically with its checkpoint, so a
/// crash loses the last few batches *and* their checkpoint together, and they
/// are applied again. Commands never use this pool: their commits stay
/// synchronous.
pub async fn connect_read_side(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("ledger-read-side")
        .options([("synchronous_commit", "off")])
        .options(crate::store::TAILING_SETTINGS);
    pool_options(max_connections).connect_with(options).await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
