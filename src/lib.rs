//! The `ledger` service: wires the command API, query API, relay and
//! projectors into one process (or a subset of them, by role).

pub mod config;

use anyhow::Context;
use config::{Config, Roles};
use ledger_api::auth::JwtKeys;
use ledger_api::live::LiveHub;
use ledger_api::rate_limit::RateLimiter;
use ledger_api::{AppState, StateParts};
use ledger_commands::identity::IdentityPolicy;
use ledger_commands::nats::NatsNames;
use ledger_commands::relay::Relay;
use ledger_commands::store::LogPoint;
use ledger_commands::{db, Ledger};
use ledger_projections::processes::{HoldExpiry, PaymentProcess};
use ledger_projections::projector::Projector;
use ledger_projections::Projection;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A running ledger: its HTTP address and the handle that stops it.
pub struct Running {
    pub addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Waits until every part has stopped (after `shutdown` is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// The write side with the identity settings from configuration.
pub fn ledger_for(config: &Config, pool: sqlx::PgPool) -> Ledger {
    let policy =
        IdentityPolicy { failures_before_backoff: config.login_failures_before_backoff, ..IdentityPolicy::default() };
    Ledger::new(pool, &config.secret_key, policy).with_fees(config.fees.clone())
}

pub async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    // Connects in the background and keeps reconnecting: commands must not
    // depend on NATS being up.
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// Migrates, then starts the selected roles. Returns once everything is listening.
pub async fn start(config: Config, roles: Roles) -> anyhow::Result<Running> {
    if config.jwt_secret_is_default {
        tracing::warn!(
            "LEDGER_JWT_SECRET is not set: using the built-in DEVELOPMENT secret. Anyone can forge tokens. Set LEDGER_JWT_SECRET in production."
        );
    }
    let pool =
        db::connect(&config.database_url, config.db_max_connections).await.context("connecting to PostgreSQL")?;
    db::migrate(&pool).await.context("applying migrations")?;
    let names = NatsNames::new(&config.nats_prefix);
    let needs_nats = roles.relay || roles.projectors || roles.processes || roles.http();
    let nats = if needs_nats { Some(connect_nats(&config.nats_url).await?) } else { None };
    if config.secret_key_is_default {
        tracing::warn!(
            "LEDGER_SECRET_KEY is not set: TOTP secrets are sealed with the built-in DEVELOPMENT key. Set LEDGER_SECRET_KEY in production."
        );
    }
    // Two session-check readers: one statement in flight while the next batch
    // gathers, as with group commit's writers.
    let ledger =
        ledger_for(&config, pool.clone()).with_group_commit(config.group_commit_writers).with_batched_session_checks(2);
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();

    if let (true, Some(client)) = (roles.relay, &nats) {
        let relay = Relay {
            pool: pool.clone(),
            js: async_nats::jetstream::new(client.clone()),
            names: names.clone(),
            wake: ledger.appended(),
            batch_size: 1_000,
            idle_poll: config.relay_poll,
            pace: config.relay_pace,
        };
        tasks.spawn(relay.run(shutdown.clone()));
        let sealer = ledger_audit::chain::Sealer {
            pool: pool.clone(),
            interval: config.relay_poll.max(Duration::from_millis(200)),
        };
        tasks.spawn(sealer.run(shutdown.clone()));
    }
    let mut applied = None;
    if let (true, Some(client)) = (roles.projectors, &nats) {
        let read_side =
            db::connect_read_side(&config.database_url, 2).await.context("connecting the read side to PostgreSQL")?;
        // One consumer and one transaction per batch for every read model:
        // a quarter of the deliveries and of the per-batch statements of a
        // projector per read model.
        let projector = Projector {
            pool: read_side.clone(),
            js: async_nats::jetstream::new(client.clone()),
            names: names.clone(),
            projections: Projection::ALL.to_vec(),
            applied: {
                let (sender, receiver) = tokio::sync::watch::channel(LogPoint::START);
                applied = Some(receiver);
                sender
            },
            pace: config.projector_pace,
        };
        tasks.spawn(projector.run(shutdown.clone()));
        // Outdated projections are rebuilt together, in one pass over the log.
        let upgrade_pool = pool.clone();
        tasks.spawn(async move {
            if let Err(e) = ledger_projections::rebuild::upgrade(upgrade_pool).await {
                tracing::error!(error = %e, "projection upgrade failed");
            }
        });
    }
    if roles.processes {
        if let Some(client) = &nats {
            let payments = PaymentProcess {
                ledger: ledger.clone(),
                js: async_nats::jetstream::new(client.clone()),
                names: names.clone(),
                auto_accept: config.order_auto_accept,
            };
            tasks.spawn(payments.run(shutdown.clone()));
        }
        let expiry = HoldExpiry { ledger: ledger.clone(), pool: pool.clone(), interval: config.hold_expiry_interval };
        tasks.spawn(expiry.run(shutdown.clone()));
    }
    let mut addr = None;
    if roles.http() {
        let state = AppState::new(StateParts {
            ledger,
            pool: pool.clone(),
            jwt: Arc::new(JwtKeys::new(&config.jwt_secret)),
            nats: nats.clone(),
            names: names.clone(),
            read_wait: config.read_wait,
            applied,
            secure_cookies: !config.insecure_cookies,
            rate_limit: Arc::new(RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst)),
            request_timeout: config.request_timeout,
            live: Arc::new(LiveHub::new(pool.clone())),
        });
        if let Some(client) = &nats {
            let feed = ledger_api::live::run_feed(
                state.live.clone(),
                async_nats::jetstream::new(client.clone()),
                names.clone(),
                shutdown.clone(),
            );
            tasks.spawn(feed);
        }
        if config.rate_limit_per_sec == 0 {
            tracing::warn!("the per-user rate limit is off (LEDGER_RATE_LIMIT_PER_SEC=0)");
        }
        let app = ledger_api::app(state, roles.command_api, roles.query_api);
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        addr = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    Ok(Running { addr, shutdown, tasks })
}
