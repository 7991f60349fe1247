//! Configuration, read once from the environment at start-up.

use ledger_domain::fees::FeeSchedule;
use std::net::SocketAddr;
use std::time::Duration;

pub const DEV_JWT_SECRET: &str = "ledger-development-secret-do-not-use-in-production";
pub const DEV_SECRET_KEY: &str = "ledger-development-sealing-key-do-not-use-in-production";

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub nats_url: String,
    pub http_addr: SocketAddr,
    pub nats_prefix: String,
    pub jwt_secret: Vec<u8>,
    pub jwt_secret_is_default: bool,
    pub db_max_connections: u32,
    /// The query API's pool (reads, session checks), apart from the commands'.
    pub db_query_connections: u32,
    /// Group-commit writers (`LEDGER_GROUP_COMMIT_WRITERS`, 2): one writes groups, the others
    /// stand by and take the next group while it is on one for over 20 ms; 0 = every command
    /// in its own transaction.
    pub group_commit_writers: usize,
    /// Events of this process the read side may be behind before batches
    /// of transfers wait (`LEDGER_BULK_MAX_BACKLOG`; 0: batches never wait).
    pub bulk_max_backlog: u32,
    /// The longest a batch waits for the read side (`LEDGER_BULK_MAX_WAIT_MS`).
    pub bulk_max_wait: Duration,
    pub read_wait: Duration,
    pub relay_poll: Duration,
    /// The projector's shortest time between batch starts (0: none).
    pub projector_pace: Duration,
    /// The relay's shortest time between reads of the log (0: none).
    pub relay_pace: Duration,
    /// Seals TOTP secrets at rest (`LEDGER_SECRET_KEY`).
    pub secret_key: Vec<u8>,
    pub secret_key_is_default: bool,
    /// Cookies without the Secure flag, for local HTTP (`LEDGER_INSECURE_COOKIES=1`).
    pub insecure_cookies: bool,
    /// Command requests per second per user or API key; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// Failed logins per email and per IP before the backoff starts.
    pub login_failures_before_backoff: u32,
    /// A request that takes longer is answered 503 `timeout`.
    pub request_timeout: Duration,
    /// Fees per kind of movement (`LEDGER_FEES`, e.g. `transfer:0.5%:0.10`); none by default.
    pub fees: FeeSchedule,
    /// The payment process captures an order's hold as soon as it is placed
    /// (`LEDGER_ORDER_AUTO_ACCEPT`, on by default); off, the merchant accepts.
    pub order_auto_accept: bool,
    /// How often the scheduler looks for holds to expire.
    pub hold_expiry_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not valid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parsed<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid { name, reason: e.to_string() }),
    }
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        let secret = var("LEDGER_JWT_SECRET");
        if secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::Invalid { name: "LEDGER_JWT_SECRET", reason: "must be at least 32 bytes".into() });
        }
        let secret_key = var("LEDGER_SECRET_KEY");
        if secret_key.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::Invalid { name: "LEDGER_SECRET_KEY", reason: "must be at least 32 bytes".into() });
        }
        Ok(Config {
            database_url: var("LEDGER_DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/ledger".into()),
            nats_url: var("LEDGER_NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            http_addr: parsed("LEDGER_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            nats_prefix: var("LEDGER_NATS_PREFIX").unwrap_or_else(|| "ledger".into()),
            jwt_secret_is_default: secret.is_none(),
            jwt_secret: secret.unwrap_or_else(|| DEV_JWT_SECRET.into()).into_bytes(),
            db_max_connections: parsed("LEDGER_DB_MAX_CONNECTIONS", 32)?,
            db_query_connections: parsed("LEDGER_DB_QUERY_CONNECTIONS", 24)?,
            group_commit_writers: parsed("LEDGER_GROUP_COMMIT_WRITERS", 2)?,
            bulk_max_backlog: parsed("LEDGER_BULK_MAX_BACKLOG", 500)?,
            bulk_max_wait: Duration::from_millis(parsed("LEDGER_BULK_MAX_WAIT_MS", 2_000)?),
            read_wait: Duration::from_millis(parsed("LEDGER_READ_WAIT_MS", 5_000)?),
            relay_poll: Duration::from_millis(parsed("LEDGER_RELAY_POLL_MS", 50)?),
            projector_pace: Duration::from_millis(parsed("LEDGER_PROJECTOR_PACE_MS", 15)?),
            relay_pace: Duration::from_millis(parsed("LEDGER_RELAY_PACE_MS", 5)?),
            secret_key_is_default: secret_key.is_none(),
            secret_key: secret_key.unwrap_or_else(|| DEV_SECRET_KEY.into()).into_bytes(),
            insecure_cookies: var("LEDGER_INSECURE_COOKIES").is_some_and(|v| v == "1" || v == "true"),
            rate_limit_per_sec: parsed("LEDGER_RATE_LIMIT_PER_SEC", 50)?,
            rate_limit_burst: parsed("LEDGER_RATE_LIMIT_BURST", 100)?,
            login_failures_before_backoff: parsed("LEDGER_LOGIN_FAILURES_BEFORE_BACKOFF", 5)?,
            request_timeout: Duration::from_millis(parsed("LEDGER_REQUEST_TIMEOUT_MS", 30_000)?),
            fees: match var("LEDGER_FEES") {
                None => FeeSchedule::default(),
                Some(text) => {
                    FeeSchedule::parse(&text).map_err(|reason| ConfigError::Invalid { name: "LEDGER_FEES", reason })?
                }
            },
            order_auto_accept: var("LEDGER_ORDER_AUTO_ACCEPT").is_none_or(|v| v != "0" && v != "false"),
            hold_expiry_interval: Duration::from_millis(parsed("LEDGER_HOLD_EXPIRY_INTERVAL_MS", 1_000)?),
        })
    }
}

/// The parts of the service one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub command_api: bool,
    pub query_api: bool,
    pub relay: bool,
    pub projectors: bool,
    /// The payment process and the hold expiry scheduler.
    pub processes: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { command_api: true, query_api: true, relay: true, projectors: true, processes: true };
    const NONE: Roles =
        Roles { command_api: false, query_api: false, relay: false, projectors: false, processes: false };

    pub fn http(&self) -> bool {
        self.command_api || self.query_api
    }
}

impl std::str::FromStr for Roles {
    type Err = String;

    fn from_str(s: &str) -> Result<Roles, String> {
        let mut roles = Roles::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "command-api" => roles.command_api = true,
                "query-api" => roles.query_api = true,
                "relay" => roles.relay = true,
                "projectors" => roles.projectors = true,
                "processes" => roles.processes = true,
                other => {
                    return Err(format!(
                        "unknown role {other:?}; roles are command-api, query-api, relay, projectors, processes"
                    ))
                }
            }
        }
        if roles == Roles::NONE {
            return Err("name at least one role".into());
        }
        Ok(roles)
    }
}
