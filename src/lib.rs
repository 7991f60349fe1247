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
use ledger_commands::store::ReadSideProgress;
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
    /// Dropped unstopped, it stops everything: the read side's threads
    /// would otherwise outlive it (a dropped `JoinSet` aborts only tasks).
    _stop_on_drop: tokio_util::sync::DropGuard,
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
    // Reads (the query API, session checks, `min_position` waits) have a
    // pool of their own: a command holds its connection for its whole
    // transaction, lock waits included, and under a load of single-command
    // transactions (holds) every read queued behind them for a connection.
    let queries = if roles.http() {
        db::connect_existing(&config.database_url, config.db_query_connections)
            .await
            .context("connecting the query API to PostgreSQL")?
    } else {
        pool.clone()
    };
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
    let relay = roles.relay && nats.is_some();
    let projector = roles.projectors && nats.is_some();
    // How far this instance's projector has applied the log: read-your-writes
    // waits on it, and batches of transfers are paced by it.
    let (applied_sender, applied_receiver) = tokio::sync::watch::channel(ReadSideProgress::default());
    let mut ledger = ledger_for(&config, pool.clone());
    if projector {
        ledger = ledger.with_read_side_gate(
            applied_receiver.clone(),
            i64::from(config.bulk_max_backlog),
            config.bulk_max_wait,
        );
    }
    let ledger = ledger.with_group_commit(config.group_commit_writers).with_batched_session_checks(queries.clone(), 2);
    let shutdown = CancellationToken::new();
    // Whatever fails below stops what was started before it (the read
    // side's threads would outlive a dropped `JoinSet`); the start does not
    // wait for them to end (a relay saving its cursor: harmless, JetStream
    // drops what is published twice).
    let stop_on_drop = shutdown.clone().drop_guard();
    let mut tasks = JoinSet::new();

    let applied = projector.then_some(applied_receiver);
    if relay || projector {
        let sender = applied_sender;
        let (url, nats_url, names, wake, stop) =
            (config.database_url.clone(), config.nats_url.clone(), names.clone(), ledger.appended(), shutdown.clone());
        let (idle_poll, relay_pace, projector_pace) = (config.relay_poll, config.relay_pace, config.projector_pace);
        on_own_thread(&mut tasks, "ledger-read-side", async move {
            let js = async_nats::jetstream::new(connect_nats(&nats_url).await?);
            let relay = match relay {
                true => {
                    let pool = db::connect_existing(&url, 2).await.context("connecting the relay to PostgreSQL")?;
                    let (names, js) = (names.clone(), js.clone());
                    let relay = Relay { pool, js, names, wake, batch_size: 1_000, idle_poll, pace: relay_pace };
                    Some(relay.run(stop.clone()))
                }
                false => None,
            };
            let projector = match projector {
                true => {
                    let pool =
                        db::connect_read_side(&url, 2).await.context("connecting the read side to PostgreSQL")?;
                    // One consumer and one transaction per batch for every
                    // read model: a quarter of the deliveries and of the
                    // per-batch statements of a projector per read model.
                    let projections = Projection::ALL.to_vec();
                    Some(Projector { pool, js, names, projections, applied: sender, pace: projector_pace }.run(stop))
                }
                false => None,
            };
            Ok(async move {
                let relay = async {
                    if let Some(relay) = relay {
                        relay.await;
                    }
                };
                let projector = async {
                    if let Some(projector) = projector {
                        projector.await;
                    }
                };
                tokio::join!(relay, projector);
            })
        })
        .await?;
    }
    if relay {
        let sealer = ledger_audit::chain::Sealer {
            pool: pool.clone(),
            interval: config.relay_poll.max(Duration::from_millis(200)),
            forms: Some(ledger.unsealed_forms()),
        };
        tasks.spawn(sealer.run(shutdown.clone()));
    }
    if projector {
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
            pool: queries.clone(),
            jwt: Arc::new(JwtKeys::new(&config.jwt_secret)),
            nats: nats.clone(),
            names: names.clone(),
            read_wait: config.read_wait,
            applied,
            secure_cookies: !config.insecure_cookies,
            rate_limit: Arc::new(RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst)),
            request_timeout: config.request_timeout,
            live: Arc::new(LiveHub::new(queries.clone())),
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
    Ok(Running { addr, shutdown, tasks, _stop_on_drop: stop_on_drop })
}

/// Starts the read side (the relay and the projector, whichever this
/// instance runs) on a thread of its own, with a current-thread runtime and
/// its own PostgreSQL and NATS connections: their round trips are answered
/// when they arrive instead of queueing behind the HTTP tasks on the main
/// runtime's workers. A projector batch's transaction took 33 ms at the
/// `holds` peak on the main runtime (ten round trips) and 6 ms on its own
/// thread. One thread for both, not one each: the read side then takes at
/// most a core from the writers under a bulk load (`batch`: 12.2–13.8k
/// transfers/s with a thread each, 14.8k with one; BENCHMARKS.md). `setup`
/// connects and returns the part; its error fails the start. The part's end
/// (after `shutdown`) ends the task added to `tasks`.
async fn on_own_thread<Part>(
    tasks: &mut JoinSet<()>,
    name: &str,
    setup: impl std::future::Future<Output = anyhow::Result<Part>> + Send + 'static,
) -> anyhow::Result<()>
where
    Part: std::future::Future<Output = ()> + 'static,
{
    let (ready, set_up) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Built here: a runtime must not be dropped inside another one
            // (as it would be, in the caller, if the spawn failed).
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                match setup.await {
                    Ok(part) => {
                        let _ = ready.send(Ok(()));
                        part.await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
            // Ends what the part left running (its pool's upkeep) before the
            // task below reports the part stopped.
            drop(runtime);
            let _ = done.send(());
        })
        .with_context(|| format!("starting the {name} thread"))?;
    let thread = name.to_owned();
    tasks.spawn(async move {
        // `done` dropped unsent: the thread panicked.
        if ended.await.is_err() {
            tracing::error!(%thread, "a read-side thread panicked; it has stopped");
        }
    });
    set_up.await.with_context(|| format!("the {name} thread stopped while starting"))?
}
