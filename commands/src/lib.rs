//! The command side: the event store, idempotency, command handling and the
//! relay that publishes the log to NATS JetStream.

pub mod db;
pub mod idempotency;
pub mod ledger;
pub mod nats;
pub mod passwords;
pub mod relay;
pub mod store;

pub use ledger::{CommandEnvelope, CommandError, Ledger, LedgerCommand, Outcome};
