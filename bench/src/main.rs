//! `ledger-bench`: a load generator for a running `ledger serve`.
//!
//! The load goes through the public HTTP contract only (register, login,
//! accounts, transfers, holds, batches). The checks after each scenario read
//! PostgreSQL directly: per-currency conservation over the whole log, and the
//! balances read model equal to a fold of the log.
//!
//! Latency is recorded in HdrHistograms. In closed-loop mode each connection
//! sends its next request when the previous one answered. In fixed-rate mode
//! (`--rate`) requests are due on a schedule and latency counts from the time
//! a request was due, not from when it was sent, so a stalled server is
//! charged for the requests it kept waiting (no coordinated omission).

mod checks;
mod client;
mod machine;
mod report;
mod scenario;
mod seed;
mod setup;
mod wire;

use anyhow::{bail, Context};
use clap::Parser;
use std::time::Duration;

/// The server's allocator: the load generator shares the machine, and
/// glibc's malloc was ~15% of its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
#[command(about = "Drives a running `ledger serve` over HTTP and reports throughput, latency and lag")]
pub struct Args {
    /// Base address of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The server's database, for the checks after each scenario.
    #[arg(long, env = "LEDGER_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/ledger_bench")]
    pub database_url: String,
    /// Comma-separated: uniform, hot, hot-debit, retry, mixed, holds, batch, or `all`.
    #[arg(long, default_value = "uniform")]
    pub scenario: String,
    /// Concurrent HTTP connections (closed loop) or request streams (fixed rate).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds before each scenario.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Fixed-rate mode: requests per second across all connections.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Accounts the transfers move among.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Users owning those accounts (registration costs an argon2id hash each).
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// Transfers per request in the `batch` scenario.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Probe projection lag after every Nth transfer written (a request
    /// of `batch` counts as its transfers; at most one probe per request;
    /// 0: never).
    #[arg(long, default_value_t = 20)]
    pub lag_every: u64,
    /// Append each scenario's figures as one JSON line to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// After the closed-loop `uniform`, run it again at a fixed rate of half
    /// the rate it reached (the latency target's operating point).
    #[arg(long)]
    pub half_peak: bool,
    /// Instead of a load: append this many events straight to the log of
    /// `--database-url` (for the replay benchmark), then exit.
    #[arg(long)]
    pub seed_log: Option<u64>,
    /// Skip the checks against the database.
    #[arg(long)]
    pub no_check: bool,
    /// Instead of a load: delete the JetStream stream of a server run with
    /// this `LEDGER_NATS_PREFIX` (the bench scripts' clean-up), then exit.
    #[arg(long, value_name = "PREFIX")]
    pub delete_stream: Option<String>,
    /// The NATS server, for `--delete-stream`.
    #[arg(long, env = "LEDGER_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(prefix) = &args.delete_stream {
        let names = ledger_commands::nats::NatsNames::new(prefix);
        let js = async_nats::jetstream::new(async_nats::connect(&args.nats_url).await?);
        return match js.delete_stream(names.stream()).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting stream {}", names.stream())),
        };
    }
    if let Some(events) = args.seed_log {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&args.database_url).await?;
        return seed::seed(&pool, events).await;
    }
    let scenarios = scenario::Scenario::parse_list(&args.scenario)?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.accounts < 2 {
        bail!("--accounts must be at least 2: a transfer needs two");
    }
    if args.batch_size == 0 || args.batch_size > 1_000 {
        bail!("--batch-size must be 1 to 1000 (the batch API's limit)");
    }
    println!(
        "ledger-bench: {} against {} with {} connections, {} s per scenario{}",
        args.scenario,
        args.url,
        args.connections,
        args.duration,
        match args.rate {
            Some(r) => format!(", fixed rate {r} req/s"),
            None => ", closed loop".into(),
        }
    );
    println!(
        "note: the server's per-user rate limit must be off for a bench (LEDGER_RATE_LIMIT_PER_SEC=0; \
         bench/run.sh starts it so); a 429 is counted as an error below"
    );
    let http = client::Http::new(&args.url, args.connections)?;
    http.wait_ready(Duration::from_secs(60)).await.context("server not ready")?;
    let world = setup::World::build(&http, &args).await?;
    let pool = if args.no_check {
        None
    } else {
        Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect_with(
                    args.database_url
                        .parse::<sqlx::postgres::PgConnectOptions>()?
                        .options(ledger_commands::store::TAILING_SETTINGS),
                )
                .await
                .with_context(|| format!("connecting to {} for the checks", args.database_url))?,
        )
    };
    let mut failed = false;
    let mut runs: std::collections::VecDeque<(scenario::Scenario, Option<f64>)> =
        scenarios.into_iter().map(|s| (s, args.rate)).collect();
    while let Some((scenario, rate)) = runs.pop_front() {
        let run_args = Args { rate, ..args.clone() };
        let result = scenario::run(&http, &world, &run_args, scenario).await?;
        if args.half_peak && rate.is_none() && scenario == scenario::Scenario::Uniform && result.requests > 0 {
            runs.push_front((scenario, Some((result.requests as f64 / result.seconds / 2.0).round())));
        }
        let check = match &pool {
            Some(pool) => Some(checks::run(pool).await?),
            None => None,
        };
        report::print(&result, check.as_ref());
        if let Some(path) = &args.json {
            report::append_json(path, &result, check.as_ref())?;
        }
        failed |= check.as_ref().is_some_and(|c| !c.passed());
    }
    if failed {
        bail!("a check after a scenario failed: see above");
    }
    Ok(())
}
