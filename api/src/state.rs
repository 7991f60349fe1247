use crate::auth::JwtKeys;
use crate::rate_limit::RateLimiter;
use ledger_commands::nats::NatsNames;
use ledger_commands::Ledger;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

/// Everything a handler needs, built once at start-up. Cloned for every
/// request (axum's `State`, the middleware): one reference count to bump,
/// not one per part (the parts' clones were ~1.3% of the server's CPU at the
/// bench's peak).
#[derive(Clone)]
pub struct AppState(Arc<StateParts>);

impl AppState {
    pub fn new(parts: StateParts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = StateParts;

    fn deref(&self) -> &StateParts {
        &self.0
    }
}

/// What an `AppState` shares.
pub struct StateParts {
    pub ledger: Ledger,
    pub pool: PgPool,
    pub jwt: Arc<JwtKeys>,
    pub nats: Option<async_nats::Client>,
    pub names: NatsNames,
    /// How long a GET with `min_position` waits for the read side.
    pub read_wait: Duration,
    /// This instance's projector's progress, when it runs one.
    pub applied: Option<ledger_projections::read_side::Applied>,
    /// Cookies carry the Secure flag unless `LEDGER_INSECURE_COOKIES=1`.
    pub secure_cookies: bool,
    pub rate_limit: Arc<RateLimiter>,
    /// A request that takes longer is answered 503 `timeout`.
    pub request_timeout: Duration,
    /// This instance's WebSocket clients.
    pub live: Arc<crate::live::LiveHub>,
}
