//! The read side: projectors that follow JetStream, the read-model tables
//! they maintain, their checkpoints, and replay from the event log.

pub mod activity;
pub mod balances;
pub mod checkpoint;
pub mod copy_in;
pub mod movement_run;
pub mod orders;
pub mod processes;
pub mod projector;
pub mod read_side;
pub mod rebuild;
pub mod statements;
pub mod time_travel;

use ledger_commands::store::RecordedEvent;
use ledger_domain::Event;
use sqlx::PgConnection;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] ledger_commands::store::StoreError),
    #[error("event {position} cannot be read: {source}")]
    Decode { position: i64, source: ledger_domain::events::EventDecodeError },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("{0}")]
    Busy(String),
    #[error("rebuild: {0}")]
    Rebuild(String),
    #[error("{0}")]
    MovementRun(#[from] movement_run::MisuseError),
    #[error("a task of the rebuild stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A read model built from the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    Balances,
    Statements,
    Activity,
    Orders,
}

impl Projection {
    pub const ALL: [Projection; 4] =
        [Projection::Balances, Projection::Statements, Projection::Activity, Projection::Orders];

    pub fn name(self) -> &'static str {
        match self {
            Projection::Balances => "balances",
            Projection::Statements => "statements",
            Projection::Activity => "activity",
            Projection::Orders => "orders",
        }
    }

    /// The version of this projection's code. Bump it when a change means the
    /// tables must be rebuilt: `ledger serve` then rebuilds them blue/green in
    /// the background while the old ones keep serving.
    pub fn version(self) -> i32 {
        match self {
            Projection::Balances => 1,
            Projection::Statements => 1,
            Projection::Activity => 1,
            Projection::Orders => 1,
        }
    }

    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The tables this projection owns; replay empties them first.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Projection::Balances => balances::TABLES,
            Projection::Statements => statements::TABLES,
            Projection::Activity => activity::TABLES,
            Projection::Orders => orders::TABLES,
        }
    }

    /// Tables that replay fills by `COPY` with their indexes created after
    /// the load: the projection keeps what it needs to read back in memory
    /// while it builds them (see `statements::Bulk`).
    pub fn bulk_tables(self) -> &'static [&'static str] {
        match self {
            Projection::Statements => statements::TABLES,
            _ => &[],
        }
    }

    /// Applies events in order, set-based where the projection allows it;
    /// the caller advances the checkpoint in the same transaction.
    pub async fn apply_all(self, conn: &mut PgConnection, events: &[RecordedEvent]) -> Result<(), ProjectionError> {
        let decoded = events
            .iter()
            .map(|r| {
                r.decode().map(|e| (r, e)).map_err(|source| ProjectionError::Decode { position: r.position, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let decoded: Vec<(&RecordedEvent, &Event)> = decoded.iter().map(|(r, e)| (*r, e)).collect();
        self.apply_decoded(conn, &decoded).await
    }

    /// `apply_all` for events already decoded (replay decodes each event once
    /// for every projection).
    pub async fn apply_decoded(
        self,
        conn: &mut PgConnection,
        events: &[(&RecordedEvent, &Event)],
    ) -> Result<(), ProjectionError> {
        match self {
            Projection::Balances => balances::apply_all(conn, events).await?,
            Projection::Statements => statements::apply_all(conn, events).await?,
            Projection::Activity => {
                for (recorded, event) in events {
                    activity::apply(conn, recorded, event).await?;
                }
            }
            Projection::Orders => {
                for (recorded, event) in events {
                    orders::apply(conn, recorded, event).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies one event; the caller advances the checkpoint in the same transaction.
    pub async fn apply(self, conn: &mut PgConnection, recorded: &RecordedEvent) -> Result<(), ProjectionError> {
        let event =
            recorded.decode().map_err(|source| ProjectionError::Decode { position: recorded.position, source })?;
        match self {
            Projection::Balances => balances::apply(conn, recorded, &event).await?,
            Projection::Statements => statements::apply(conn, recorded, &event).await?,
            Projection::Activity => activity::apply(conn, recorded, &event).await?,
            Projection::Orders => orders::apply(conn, recorded, &event).await?,
        }
        Ok(())
    }
}
