use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::config::{Config, Roles};
use ledger_commands::{db, ClientInfo};
use ledger_domain::events::Role;
use ledger_projections::Projection;

#[derive(Parser)]
#[command(name = "ledger", about = "Event-sourced ledger", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: command API, query API, relay and projectors.
    Serve {
        /// Comma-separated subset of command-api,query-api,relay,projectors,processes.
        #[arg(long, default_value = "command-api,query-api,relay,projectors,processes")]
        roles: Roles,
    },
    /// Apply database migrations (serve also does this at start-up).
    Migrate,
    /// Tamper-evident audit exports and their verification.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Administration from the command line.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Rebuild read models from the event log.
    Replay {
        /// The projection to rebuild: balances, statements, activity or orders.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        projection: Option<String>,
        /// Rebuild every projection.
        #[arg(long)]
        all: bool,
        /// Rebuild into shadow tables and report differences from the live
        /// read model, without swapping (with --compare).
        #[arg(long, requires = "compare")]
        dry_run: bool,
        #[arg(long, requires = "dry_run")]
        compare: bool,
        /// Start over instead of resuming an interrupted rebuild.
        #[arg(long)]
        fresh: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Export events in log order with a hash chain and a closing manifest.
    Export {
        /// RFC 3339 time, inclusive.
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// RFC 3339 time, exclusive.
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Events by or about this user, or touching their accounts.
        #[arg(long)]
        user: Option<uuid::Uuid>,
        /// Events touching this account.
        #[arg(long)]
        account: Option<uuid::Uuid>,
        /// Only this event type (repeatable).
        #[arg(long = "type")]
        types: Vec<String>,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// A file, or - for standard output.
        #[arg(long)]
        output: String,
    },
    /// Verify an export's chain and manifest (FILE), or the database's own chain (--db).
    /// With both, the export's anchor is also checked against the database's chain.
    Verify {
        #[arg(required_unless_present = "db")]
        file: Option<std::path::PathBuf>,
        #[arg(long)]
        db: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user with a role (the first admin, say). The password is read
    /// from standard input, one line, so it never appears in shell history or `ps`.
    CreateUser {
        #[arg(long)]
        email: String,
        /// user, support or admin.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long)]
        display_name: Option<String>,
    },
}

/// mimalloc instead of glibc's malloc: glibc keeps a heap arena per thread,
/// and password hashing (19 MiB per argon2id) on the blocking pool's threads
/// left hundreds of MB resident; it is also faster on the request path.
/// Its v2 line (the `v2` feature), not the crate's default v3: at a fixed
/// 2,500 transfers/s, four alternating pairs gave p99 25–30 ms against 31–51
/// and ~2% less server CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let config = Config::from_env()?;
    match cli.command {
        Command::Serve { roles } => {
            let running = ledger::start(config, roles).await?;
            let shutdown = running.shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("shutting down");
                shutdown.cancel();
            });
            running.wait().await;
        }
        Command::Migrate => {
            let pool = db::connect(&config.database_url, 2).await.context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("applying migrations")?;
            tracing::info!("migrations applied");
        }
        Command::Admin { command: AdminCommand::CreateUser { email, role, display_name } } => {
            let role = Role::parse(role.trim()).context("--role must be user, support or admin")?;
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            let pool = db::connect(&config.database_url, 2).await.context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("applying migrations")?;
            let ledger = ledger::ledger_for(&config, pool);
            let (user_id, _) = ledger
                .register(email.clone(), password, display_name, &ClientInfo::default())
                .await
                .map_err(|e| anyhow::anyhow!("creating {email}: {e}"))?;
            if role != Role::User {
                ledger
                    .assign_role(user_id, role, "created by `ledger admin create-user`")
                    .await
                    .map_err(|e| anyhow::anyhow!("giving {email} the {} role: {e}", role.as_str()))?;
            }
            println!("{user_id}");
            tracing::info!(%user_id, role = role.as_str(), "user created");
        }
        Command::Audit { command } => {
            let code = audit(&config, command).await?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::Replay { projection, all, dry_run, compare: _, fresh } => {
            let projections = match (projection, all) {
                (_, true) => Projection::ALL.to_vec(),
                (Some(name), false) => vec![Projection::from_name(&name).with_context(|| {
                    format!("unknown projection {name:?}; known: balances, statements, activity, orders")
                })?],
                (None, false) => anyhow::bail!("name --projection NAME or --all"),
            };
            // Per projection: its rebuild lock and its builder; one reader; a few for the rest.
            let pool = db::connect(&config.database_url, 2 * projections.len() as u32 + 3)
                .await
                .context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("applying migrations")?;
            let mut exit_code = 0;
            let bar_style =
                ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}")?
                    .progress_chars("=> ");
            if !dry_run {
                let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
                let bar = ProgressBar::new(0).with_style(bar_style.clone());
                bar.set_prefix("replay");
                let started = std::time::Instant::now();
                let applied =
                    ledger_projections::rebuild::rebuild_all(&pool, &projections, fresh, &mut |done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    })
                    .await?;
                bar.finish();
                for (projection, events) in applied {
                    tracing::info!(projection = projection.name(), events, "rebuilt and swapped in");
                }
                tracing::info!(
                    projections = names.join(","),
                    seconds = started.elapsed().as_secs_f64(),
                    "replay finished"
                );
            }
            for projection in projections.into_iter().filter(|_| dry_run) {
                let bar = ProgressBar::new(0).with_style(bar_style.clone());
                bar.set_prefix(projection.name());
                let mut progress = |done: u64, total: u64| {
                    bar.set_length(total);
                    bar.set_position(done);
                };
                let differences = ledger_projections::rebuild::compare(&pool, projection, &mut progress).await?;
                bar.finish_and_clear();
                if differences.is_empty() {
                    println!("{}: the rebuilt read model equals the live one", projection.name());
                } else {
                    for (table, only_rebuilt, only_live) in &differences.tables {
                        for row in only_rebuilt {
                            println!("{table}: only in the rebuild: {row}");
                        }
                        for row in only_live {
                            println!("{table}: only in the live model: {row}");
                        }
                    }
                    exit_code = 1;
                }
            }
            if exit_code != 0 {
                std::process::exit(exit_code);
            }
        }
    }
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LEDGER_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("LEDGER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs an audit command; the exit code is 0 only when everything verified.
async fn audit(config: &Config, command: AuditCommand) -> anyhow::Result<i32> {
    use ledger_audit::export::{self, Filter, Format};
    use std::io::Write;
    match command {
        AuditCommand::Export { from, to, user, account, types, format, output } => {
            let format = Format::parse(&format).context("--format must be jsonl or csv")?;
            let pool = db::connect(&config.database_url, 4).await.context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("applying migrations")?;
            let filter = Filter { from, to, user, account, types };
            let total = export::count(&pool, &filter).await?;
            let mut sink: Box<dyn Write + Send> = if output == "-" {
                Box::new(std::io::BufWriter::new(std::io::stdout()))
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&output).with_context(|| format!("creating {output}"))?,
                ))
            };
            let bar = if output == "-" { ProgressBar::hidden() } else { ProgressBar::new(total) };
            bar.set_style(
                ProgressStyle::with_template("export [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}")?
                    .progress_chars("=> "),
            );
            let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
            let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                while let Some(line) = rx.blocking_recv() {
                    sink.write_all(line.as_bytes())?;
                    bar.inc(1);
                }
                bar.finish_and_clear();
                sink.flush()
            });
            let ledger = ledger::ledger_for(config, pool.clone());
            let summary = export::export(&pool, &filter, format, tx, Some(&ledger)).await?;
            writer.await.context("the writer stopped")?.context("writing the export")?;
            tracing::info!(count = summary.count, final_hash = %summary.final_hash, "exported");
            Ok(0)
        }
        AuditCommand::Verify { file: Some(path), db } => {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let v = match ledger_audit::verify::verify(std::io::BufReader::new(file)) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    return Ok(1);
                }
            };
            println!("OK: {} records, final hash {}", v.count, v.final_hash);
            match &v.chain_anchor {
                Some(anchor) => println!("chain anchor: {anchor}"),
                None if v.count > 0 => {
                    println!("warning: no chain anchor (the last event was not sealed yet when exported)")
                }
                None => {}
            }
            if v.unverified_personal > 0 {
                println!("note: {} records carry opened personal data, which no hash covers", v.unverified_personal);
            }
            if db {
                // The file's anchor must be the ledger's own link at that position.
                let pool = db::connect(&config.database_url, 2).await.context("connecting to PostgreSQL")?;
                let (Some(anchor), Some(position)) = (v.chain_anchor.as_ref(), v.last_position) else {
                    eprintln!("FAILED: the export has no anchor to check against the database");
                    return Ok(1);
                };
                let link: Option<String> = sqlx::query_scalar("SELECT hash FROM event_chain WHERE position = $1")
                    .bind(position)
                    .fetch_optional(&pool)
                    .await?;
                if link.as_deref() != anchor["hash"].as_str() {
                    eprintln!("FAILED: the anchor at position {position} is not the database's chain link there");
                    return Ok(1);
                }
                println!("anchor matches the database's chain at position {position}");
            }
            Ok(0)
        }
        AuditCommand::Verify { .. } => {
            let pool = db::connect(&config.database_url, 4).await.context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("applying migrations")?;
            let bar = ProgressBar::new_spinner();
            let authenticator = ledger_commands::store::EventMac::new(&config.secret_key);
            if config.secret_key_is_default {
                println!("warning: LEDGER_SECRET_KEY is not set; event MACs are checked with the development key");
            }
            let result = ledger_audit::chain::verify_db(&pool, Some(&authenticator), |n| {
                if n % 10_000 == 0 {
                    bar.set_message(format!("{n} links checked"));
                    bar.tick();
                }
            })
            .await?;
            bar.finish_and_clear();
            match result.first_break {
                None => {
                    println!("OK: {} sealed events verified, {} not sealed yet", result.sealed, result.unsealed);
                    Ok(0)
                }
                Some(b) => {
                    eprintln!("FAILED: {b:?} (after {} sealed events)", result.sealed);
                    Ok(1)
                }
            }
        }
    }
}
