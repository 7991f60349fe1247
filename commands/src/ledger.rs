//! Command handling: load state, decide, append, all in one transaction with
//! the idempotency record.

use crate::idempotency::{self, CommandRecord};
use crate::passwords;
use crate::store::{
    self, account_stream, is_unique_violation, transfer_stream, user_stream, EventMetadata, StoreError, StreamAppend,
};
use chrono::Utc;
use ledger_domain::account::{self, system_account_id, AccountCommand, AccountState, MoveMoney};
use ledger_domain::events::{AccountKind, TransferKind};
use ledger_domain::money::Amount;
use ledger_domain::user::{self, UserCommand, UserState};
use ledger_domain::{DomainError, Event};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

/// How many times a command is retried after losing an optimistic-concurrency race.
pub const MAX_CONFLICT_RETRIES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyKeyReuse,
    #[error("the command kept colliding with concurrent writes; retry it")]
    ConcurrencyConflict,
    #[error("this email address is already registered")]
    EmailTaken,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error(transparent)]
    Rejected(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("password hashing failed")]
    Hashing,
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        CommandError::Store(StoreError::Database(e))
    }
}

/// A money or account command from an authenticated user.
#[derive(Clone, Debug)]
///
/// Amounts arrive as the client sent them and are parsed inside the command,
/// so a malformed amount is recorded under the Idempotency-Key like any other
/// rejection.
pub enum LedgerCommand {
    OpenAccount { currency: String, name: Option<String> },
    Deposit { account_id: Uuid, amount: String, reference: Option<String> },
    Withdraw { account_id: Uuid, amount: String, reference: Option<String> },
    Transfer { from_account: Uuid, to_account: Uuid, amount: String, reference: Option<String> },
}

/// Who sends a command and under which key.
#[derive(Clone, Debug)]
pub struct CommandEnvelope {
    pub actor: Uuid,
    pub idempotency_key: String,
    pub request_hash: Vec<u8>,
    pub correlation_id: Option<Uuid>,
}

/// The HTTP outcome of a command: the first one, or its replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
    pub position: Option<i64>,
}

/// Turns a domain rejection into the status and body stored for its key.
pub type RenderRejection = fn(&DomainError) -> (u16, Value);

/// The write side of the ledger.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    appended: Arc<Notify>,
}

struct Decision {
    appends: Vec<StreamAppend>,
    body: Value,
}

impl Ledger {
    pub fn new(pool: PgPool) -> Ledger {
        Ledger { pool, appended: Arc::new(Notify::new()) }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Signalled after every commit that appended events; wakes a local relay early.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// Runs a command exactly once per (user, key). Domain rejections are
    /// recorded like successes; conflicts are retried, then reported.
    pub async fn execute(
        &self,
        envelope: &CommandEnvelope,
        command: LedgerCommand,
        render: RenderRejection,
    ) -> Result<Outcome, CommandError> {
        for attempt in 0..=MAX_CONFLICT_RETRIES {
            match self.try_execute(envelope, &command, render).await {
                Err(CommandError::Store(StoreError::Conflict)) => {
                    tracing::debug!(attempt, "stream version conflict, retrying");
                    tokio::time::sleep(Duration::from_millis(1 + u64::from(attempt) * 3)).await;
                }
                other => return other,
            }
        }
        Err(CommandError::ConcurrencyConflict)
    }

    async fn try_execute(
        &self,
        envelope: &CommandEnvelope,
        command: &LedgerCommand,
        render: RenderRejection,
    ) -> Result<Outcome, CommandError> {
        let mut tx = self.pool.begin().await?;
        idempotency::lock_key(&mut tx, envelope.actor, &envelope.idempotency_key).await?;
        if let Some(previous) = idempotency::find(&mut tx, envelope.actor, &envelope.idempotency_key).await? {
            return replay(previous, envelope);
        }
        let command_id = Uuid::now_v7();
        let (status, body, position) = match decide(&mut tx, envelope.actor, command.clone()).await? {
            Ok(Decision { appends, mut body }) => {
                let metadata = EventMetadata {
                    command_id: Some(command_id),
                    correlation_id: Some(envelope.correlation_id.unwrap_or(command_id)),
                    causation_id: None,
                    actor_id: Some(envelope.actor),
                    recorded_at: Utc::now(),
                };
                let position = store::append(&mut tx, &appends, &metadata).await?;
                body["position"] = json!(position);
                (201, body, position)
            }
            Err(rejection) => {
                let (status, body) = render(&rejection);
                (status, body, None)
            }
        };
        idempotency::record(
            &mut tx,
            envelope.actor,
            &envelope.idempotency_key,
            command_id,
            &envelope.request_hash,
            status,
            &body,
            position,
        )
        .await?;
        tx.commit().await?;
        if position.is_some() {
            self.appended.notify_one();
        }
        Ok(Outcome { status, body, replayed: false, position })
    }

    /// The recorded outcome of a key, for a client that lost the answer.
    pub async fn recorded_outcome(&self, actor: Uuid, key: &str) -> Result<Option<CommandRecord>, CommandError> {
        let mut conn = self.pool.acquire().await?;
        Ok(idempotency::find(&mut conn, actor, key).await?)
    }

    /// Registers a user: the event and the credentials in one transaction.
    pub async fn register(
        &self,
        email: String,
        password: String,
        display_name: Option<String>,
    ) -> Result<(Uuid, i64), CommandError> {
        user::check_password(&password)?;
        let user_id = Uuid::now_v7();
        let events = user::decide(&UserState::default(), UserCommand::Register { user_id, email, display_name })?;
        let Some(Event::UserRegistered(registered)) = events.first() else {
            return Err(CommandError::Hashing);
        };
        let email = registered.email.clone();
        let hash = tokio::task::spawn_blocking(move || passwords::hash(&password))
            .await
            .map_err(|_| CommandError::Hashing)?
            .map_err(|_| CommandError::Hashing)?;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query("INSERT INTO credentials (user_id, email, password_hash) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(&email)
            .bind(&hash)
            .execute(&mut *tx)
            .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(CommandError::EmailTaken),
            other => {
                other?;
            }
        }
        let command_id = Uuid::now_v7();
        let metadata = EventMetadata {
            command_id: Some(command_id),
            correlation_id: Some(command_id),
            causation_id: None,
            actor_id: Some(user_id),
            recorded_at: Utc::now(),
        };
        let appends = [StreamAppend { stream_id: user_stream(user_id), expected_version: 0, events }];
        let position = store::append(&mut tx, &appends, &metadata).await?.unwrap_or_default();
        tx.commit().await?;
        self.appended.notify_one();
        Ok((user_id, position))
    }

    /// Checks credentials; the same cost whether or not the email is known.
    pub async fn authenticate(&self, email: &str, password: String) -> Result<Uuid, CommandError> {
        let email = email.trim().to_lowercase();
        let row: Option<(Uuid, String)> =
            sqlx::query_as("SELECT user_id, password_hash FROM credentials WHERE email = $1")
                .bind(&email)
                .fetch_optional(&self.pool)
                .await?;
        let (user_id, stored) = match row {
            Some((id, h)) => (Some(id), Some(h)),
            None => (None, None),
        };
        let ok = tokio::task::spawn_blocking(move || passwords::verify(stored.as_deref(), &password))
            .await
            .map_err(|_| CommandError::Hashing)?;
        match (ok, user_id) {
            (true, Some(id)) => Ok(id),
            _ => Err(CommandError::InvalidCredentials),
        }
    }
}

fn replay(previous: CommandRecord, envelope: &CommandEnvelope) -> Result<Outcome, CommandError> {
    if previous.request_hash != envelope.request_hash {
        return Err(CommandError::IdempotencyKeyReuse);
    }
    Ok(Outcome { status: previous.status as u16, body: previous.response, replayed: true, position: previous.position })
}

async fn account_state(
    conn: &mut PgConnection,
    account_id: Uuid,
    with_movements: bool,
) -> Result<(AccountState, i64), StoreError> {
    let (events, version) = if with_movements {
        store::load_account(conn, account_id).await?
    } else {
        (store::load_account_opening(conn, account_id).await?, 1)
    };
    Ok((events.iter().fold(AccountState::default(), account::evolve), version))
}

const ACCOUNT_LOCK_CLASS: i32 = 0x4C45_4447;

/// Serialises debits of one account across every instance: the loser of a
/// race waits here instead of failing its optimistic append.
async fn lock_account(conn: &mut PgConnection, account_id: Uuid) -> Result<(), sqlx::Error> {
    // The two-key form lives in a lock space apart from the idempotency locks.
    let (hi, lo) = account_id.as_u64_pair();
    let folded = hi ^ lo;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(ACCOUNT_LOCK_CLASS)
        .bind((folded ^ (folded >> 32)) as u32 as i32)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Loads what a command needs and decides it. `Ok(Err(_))` is a domain rejection.
async fn decide(
    conn: &mut PgConnection,
    actor: Uuid,
    command: LedgerCommand,
) -> Result<Result<Decision, DomainError>, StoreError> {
    match command {
        LedgerCommand::OpenAccount { currency, name } => {
            let account_id = Uuid::now_v7();
            let decided = account::decide(
                &AccountState::default(),
                AccountCommand::Open { account_id, owner_id: actor, currency, name },
            );
            Ok(decided.map(|events| {
                let body = match events.first() {
                    Some(Event::AccountOpened(a)) => json!({
                        "account_id": a.account_id,
                        "currency": a.currency,
                        "name": a.name,
                    }),
                    _ => json!({ "account_id": account_id }),
                };
                Decision {
                    appends: vec![StreamAppend { stream_id: account_stream(account_id), expected_version: 0, events }],
                    body,
                }
            }))
        }
        LedgerCommand::Deposit { account_id, amount, reference } => {
            let amount = match Amount::parse("amount", &amount) {
                Ok(a) => a,
                Err(rejection) => return Ok(Err(rejection)),
            };
            let (to, _) = account_state(conn, account_id, false).await?;
            let Some(currency) = to.currency().filter(|_| to.is_owned_by(actor)) else {
                return Ok(Err(DomainError::AccountNotFound(account_id)));
            };
            let system_id = system_account_id(currency);
            let (mut system, _) = account_state(conn, system_id, false).await?;
            let mut appends = open_system_if_missing(&mut system, currency);
            let transfer_id = Uuid::now_v7();
            let decided = account::decide_transfer(
                &system,
                &to,
                MoveMoney {
                    transfer_id,
                    kind: TransferKind::Deposit,
                    initiated_by: actor,
                    from_account: system_id,
                    to_account: account_id,
                    amount,
                    reference,
                },
            );
            Ok(decided.map(|events| {
                // The debit side is a system account: no invariant to guard, so
                // the movement gets its own stream and never contends.
                appends.push(StreamAppend { stream_id: transfer_stream(transfer_id), expected_version: 0, events });
                Decision { appends, body: json!({ "transfer_id": transfer_id }) }
            }))
        }
        LedgerCommand::Withdraw { account_id, amount, reference } => {
            let amount = match Amount::parse("amount", &amount) {
                Ok(a) => a,
                Err(rejection) => return Ok(Err(rejection)),
            };
            lock_account(conn, account_id).await?;
            let (from, version) = account_state(conn, account_id, true).await?;
            let Some(currency) = from.currency().filter(|_| from.is_owned_by(actor)) else {
                return Ok(Err(DomainError::AccountNotFound(account_id)));
            };
            let system_id = system_account_id(currency);
            let (mut system, _) = account_state(conn, system_id, false).await?;
            let mut appends = open_system_if_missing(&mut system, currency);
            let transfer_id = Uuid::now_v7();
            let decided = account::decide_transfer(
                &from,
                &system,
                MoveMoney {
                    transfer_id,
                    kind: TransferKind::Withdrawal,
                    initiated_by: actor,
                    from_account: account_id,
                    to_account: system_id,
                    amount,
                    reference,
                },
            );
            Ok(decided.map(|events| {
                appends.push(StreamAppend { stream_id: account_stream(account_id), expected_version: version, events });
                Decision { appends, body: json!({ "transfer_id": transfer_id }) }
            }))
        }
        LedgerCommand::Transfer { from_account, to_account, amount, reference } => {
            let amount = match Amount::parse("amount", &amount) {
                Ok(a) => a,
                Err(rejection) => return Ok(Err(rejection)),
            };
            lock_account(conn, from_account).await?;
            let (from, version) = account_state(conn, from_account, true).await?;
            let (to, _) = account_state(conn, to_account, false).await?;
            let transfer_id = Uuid::now_v7();
            let decided = account::decide_transfer(
                &from,
                &to,
                MoveMoney {
                    transfer_id,
                    kind: TransferKind::Transfer,
                    initiated_by: actor,
                    from_account,
                    to_account,
                    amount,
                    reference,
                },
            );
            Ok(decided.map(|events| Decision {
                appends: vec![StreamAppend {
                    stream_id: account_stream(from_account),
                    expected_version: version,
                    events,
                }],
                body: json!({ "transfer_id": transfer_id }),
            }))
        }
    }
}

/// The first movement in a currency opens its system account in the same append.
fn open_system_if_missing(system: &mut AccountState, currency: ledger_domain::Currency) -> Vec<StreamAppend> {
    if system.kind() == Some(AccountKind::System) {
        return vec![];
    }
    match account::decide(system, AccountCommand::OpenSystem { currency }) {
        Ok(events) => {
            *system = events.iter().fold(std::mem::take(system), account::evolve);
            vec![StreamAppend { stream_id: account_stream(system_account_id(currency)), expected_version: 0, events }]
        }
        Err(_) => vec![],
    }
}
