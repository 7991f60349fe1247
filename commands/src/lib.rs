//! The command side: the event store, idempotency, command handling and the
//! relay that publishes the log to NATS JetStream.

pub mod backoff;
pub mod batch;
pub mod db;
pub mod group_commit;
pub mod idempotency;
pub mod identity;
pub mod ledger;
pub mod nats;
pub mod passwords;
pub mod payments;
pub mod personal;
pub mod read_side_gate;
pub mod relay;
pub mod secrets;
pub mod session_checks;
pub mod store;
pub mod totp;
pub mod unsealed;

pub use ledger::{ClientInfo, CommandEnvelope, CommandError, Ledger, LedgerCommand, Outcome};
