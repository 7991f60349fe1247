use crate::auth::JwtKeys;
use ledger_commands::nats::NatsNames;
use ledger_commands::Ledger;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// Everything a handler needs, built once at start-up.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
    pub pool: PgPool,
    pub jwt: Arc<JwtKeys>,
    pub nats: Option<async_nats::Client>,
    pub names: NatsNames,
    /// How long a GET with `min_position` waits for the read side.
    pub read_wait: Duration,
}
