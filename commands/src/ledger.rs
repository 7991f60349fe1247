//! Command handling: load state, decide, append, all in one transaction with
//! the idempotency record.

use crate::idempotency::{self, CommandRecord};
use crate::identity::IdentityPolicy;
use crate::payments::AfterLocks;
use crate::secrets::SecretBox;
use crate::store::{self, account_stream, transfer_stream, user_stream, EventMetadata, StoreError, StreamAppend};
use chrono::Utc;
use ledger_domain::account::{self, system_account_id, AccountCommand, AccountState, MoveMoney};
use ledger_domain::events::Role;
use ledger_domain::events::{AccountKind, TransferKind};
use ledger_domain::fees::FeeSchedule;
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
    #[error("two-factor authentication is on: send the current code as \"totp\", or a recovery code")]
    TwoFactorRequired,
    #[error("the two-factor code is wrong or was already used")]
    TwoFactorInvalid,
    #[error("two-factor authentication has not been set up: call /v1/auth/2fa/setup first")]
    TwoFactorNotSetUp,
    #[error("this user is blocked")]
    UserBlocked,
    #[error("the session has ended; log in again")]
    SessionEnded,
    #[error("too many failed logins; retry after {retry_after} s")]
    TooManyAttempts { retry_after: u64 },
    #[error("this refresh token was already used; the session has been revoked")]
    RefreshTokenReused,
    #[error("the refresh token is invalid or expired")]
    RefreshTokenInvalid,
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("no such session is yours")]
    SessionNotFound,
    #[error("no such API key is yours")]
    ApiKeyNotFound,
    #[error("a stored secret could not be opened")]
    Secret(#[from] crate::secrets::SealError),
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
    OpenAccount {
        currency: String,
        name: Option<String>,
    },
    Deposit {
        account_id: Uuid,
        amount: String,
        reference: Option<String>,
    },
    Withdraw {
        account_id: Uuid,
        amount: String,
        reference: Option<String>,
    },
    Transfer {
        from_account: Uuid,
        to_account: Uuid,
        amount: String,
        reference: Option<String>,
    },
    /// Admin actions: the caller's role is checked by the API's access policy.
    BlockUser {
        user_id: Uuid,
        reason: String,
    },
    UnblockUser {
        user_id: Uuid,
        reason: String,
    },
    ChangeRole {
        user_id: Uuid,
        role: Role,
        reason: Option<String>,
    },
    FreezeAccount {
        account_id: Uuid,
        reason: String,
    },
    UnfreezeAccount {
        account_id: Uuid,
        reason: String,
    },
    /// Holds: place by the payer; capture and release by either party (or
    /// the system, for orders); expire by the scheduler.
    PlaceHold {
        from_account: Uuid,
        to_account: Uuid,
        amount: String,
        expires_in_seconds: Option<i64>,
        reference: Option<String>,
    },
    CaptureHold {
        hold_id: Uuid,
        amount: Option<String>,
    },
    ReleaseHold {
        hold_id: Uuid,
    },
    ExpireHold {
        hold_id: Uuid,
    },
    /// Orders: placed by the customer, paid and accepted by the payment
    /// process, cancelled by the customer, refunded by the merchant or an admin.
    PlaceOrder {
        account_id: Uuid,
        merchant_account: Uuid,
        amount: String,
        description: String,
    },
    PayOrder {
        order_id: Uuid,
    },
    AcceptOrder {
        order_id: Uuid,
    },
    CancelOrder {
        order_id: Uuid,
    },
    RefundOrder {
        order_id: Uuid,
        amount: String,
        as_admin: bool,
    },
    /// An all-or-none batch of transfers, each with its own key.
    TransferBatch {
        items: Vec<crate::batch::BatchItem>,
    },
    /// Crypto-shredding: destroys the user's personal-data key.
    ForgetUser {
        user_id: Uuid,
        reason: String,
    },
}

/// Where a request came from, recorded in the metadata of identity events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Who sends a command and under which key.
#[derive(Clone, Debug)]
pub struct CommandEnvelope {
    pub actor: Uuid,
    pub idempotency_key: String,
    pub request_hash: Vec<u8>,
    pub correlation_id: Option<Uuid>,
    pub client: ClientInfo,
    /// The event that caused this command, for commands the system sends in
    /// reaction to one; its command id is then derived from the key.
    pub causation_id: Option<Uuid>,
    /// The caller's session when the API left its check to the write: the
    /// command is refused (`SessionEnded`, `UserBlocked`, nothing recorded)
    /// unless the session is live and its user not blocked. A group (of
    /// transfers and hold commands), and a hold command alone
    /// (`payments::decide_hold`), check it in the statement
    /// that reads its records (the snapshot it decides on), which saves each
    /// command a round trip of its own.
    pub unchecked_session: Option<Uuid>,
}

/// Namespace of command ids derived from an Idempotency-Key.
const COMMAND_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d63_6f6d_6d61_6e64_2d69);

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
    pub(crate) pool: PgPool,
    pub(crate) appended: Arc<Notify>,
    pub(crate) secrets: Arc<SecretBox>,
    pub(crate) policy: IdentityPolicy,
    /// Bounds concurrent argon2id work (19 MiB each) so a flood of logins or
    /// registrations queues instead of exhausting memory.
    pub(crate) hashing: Arc<tokio::sync::Semaphore>,
    pub(crate) fees: Arc<FeeSchedule>,
    /// Keys pseudonyms of addresses that belong to nobody (failed logins).
    pub(crate) pseudonym_key: Arc<Vec<u8>>,
    pub(crate) event_mac: Arc<store::EventMac>,
    /// The canonical forms `event_mac` keeps for this process's chain sealer.
    pub(crate) unsealed: Arc<crate::unsealed::UnsealedForms>,
    /// Transfers and hold commands go through group commit when it is on.
    pub(crate) group: Option<crate::group_commit::GroupCommit>,
    /// Concurrent session checks are read together when this is on.
    pub(crate) session_checks: Option<crate::session_checks::SessionChecks>,
    /// Sessions whose writes were refused as ended (`unchecked_session`).
    pub(crate) ended_sessions: crate::session_checks::EndedSessions,
    /// Batches wait while the read side is far behind, when this is on.
    pub(crate) read_side_gate: Option<Arc<crate::read_side_gate::ReadSideGate>>,
}

pub(crate) struct Decision {
    pub(crate) appends: Vec<StreamAppend>,
    pub(crate) body: Value,
    /// 201 for a new resource or movement, 200 for a change of state.
    pub(crate) status: u16,
    /// Write-side caches that change with the events, in the same transaction.
    pub(crate) effect: Option<Effect>,
    /// Idempotency records of a batch's items, written with the batch.
    pub(crate) items: Vec<crate::batch::ItemRecord>,
}

impl Decision {
    pub(crate) fn created(appends: Vec<StreamAppend>, body: Value) -> Decision {
        Decision { appends, body, status: 201, effect: None, items: vec![] }
    }

    /// A change of state of something that exists (200).
    pub(crate) fn changed(appends: Vec<StreamAppend>, body: Value) -> Decision {
        Decision { status: 200, ..Decision::created(appends, body) }
    }
}

pub(crate) enum Effect {
    Role(Uuid, Role),
    Blocked(Uuid, bool),
    Forgotten(Uuid),
}

impl Ledger {
    pub fn new(pool: PgPool, secret_key: &[u8], policy: IdentityPolicy) -> Ledger {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let unsealed = Arc::new(crate::unsealed::UnsealedForms::default());
        Ledger {
            pool,
            appended: Arc::new(Notify::new()),
            secrets: Arc::new(SecretBox::new(secret_key)),
            policy,
            hashing: Arc::new(tokio::sync::Semaphore::new(cores * 2)),
            fees: Arc::new(FeeSchedule::default()),
            pseudonym_key: Arc::new(secret_key.to_vec()),
            event_mac: Arc::new(store::EventMac::new(secret_key).keeping_forms_in(unsealed.clone())),
            unsealed,
            group: None,
            session_checks: None,
            ended_sessions: Default::default(),
            read_side_gate: None,
        }
    }

    /// Decides and writes concurrent transfers and hold commands in groups, `writers` groups
    /// in flight at once (see `group_commit`). Needs a Tokio runtime.
    pub fn with_group_commit(mut self, writers: usize) -> Ledger {
        if writers > 0 {
            self.group = Some(crate::group_commit::GroupCommit::start(self.clone(), writers));
        }
        self
    }

    /// Answers concurrent session checks with one statement per batch,
    /// `readers` batches in flight at once (see `session_checks`). Needs a
    /// Tokio runtime.
    pub fn with_batched_session_checks(mut self, pool: PgPool, readers: usize) -> Ledger {
        if readers > 0 {
            self.session_checks = Some(crate::session_checks::SessionChecks::start(pool, readers));
        }
        self
    }

    /// Batches of transfers wait, `max_wait` at most, while `max_backlog`
    /// events of this process (committed, or items of batches admitted) are
    /// not applied by its read side (`applied`; see `read_side_gate`).
    /// Before `with_group_commit`, whose writers keep a copy of the ledger
    /// (their commits would go uncounted).
    pub fn with_read_side_gate(
        mut self,
        applied: tokio::sync::watch::Receiver<store::ReadSideProgress>,
        max_backlog: i64,
        max_wait: std::time::Duration,
    ) -> Ledger {
        debug_assert!(self.group.is_none(), "the read-side gate goes on before group commit");
        if max_backlog > 0 {
            let gate = crate::read_side_gate::ReadSideGate::new(applied, max_backlog, max_wait);
            self.read_side_gate = Some(Arc::new(gate));
        }
        self
    }

    /// Records a commit that appended events: wakes a local relay, and
    /// tells the read-side gate how far this process has written.
    pub(crate) fn committed(&self, position: Option<i64>) {
        let Some(position) = position else { return };
        self.appended.notify_one();
        if let Some(gate) = &self.read_side_gate {
            gate.appended(position);
        }
    }

    /// The fee schedule charged on transfers and withdrawals (none by default).
    pub fn with_fees(mut self, fees: FeeSchedule) -> Ledger {
        self.fees = Arc::new(fees);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where this ledger's appends keep their canonical forms for the audit
    /// chain's sealer in this process (see `unsealed`).
    pub fn unsealed_forms(&self) -> Arc<crate::unsealed::UnsealedForms> {
        self.unsealed.clone()
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
        if let Some(group) = &self.group {
            if let Some(outcome) = group.submit(envelope, &command, render).await {
                return outcome;
            }
        }
        let _admitted = match (&command, &self.read_side_gate) {
            (LedgerCommand::TransferBatch { items }, Some(gate)) => Some(gate.admit(items.len()).await),
            _ => None,
        };
        self.execute_direct(envelope, command, render).await
    }

    /// Refuses a command whose session the API left unchecked if it has
    /// ended or its user is blocked (the extractor's answers, from the same
    /// check).
    async fn check_unchecked_session(&self, envelope: &CommandEnvelope) -> Result<(), CommandError> {
        let Some(session_id) = envelope.unchecked_session else { return Ok(()) };
        match self.check_session(envelope.actor, session_id).await?.refusal() {
            None => Ok(()),
            Some(refusal) => Err(self.refused_session(session_id, refusal)),
        }
    }

    /// Remembers a session a write found ended; passes the refusal on.
    pub(crate) fn refused_session(&self, session_id: Uuid, refusal: CommandError) -> CommandError {
        if matches!(refusal, CommandError::SessionEnded) {
            self.ended_sessions.remember(session_id);
        }
        refusal
    }

    /// Whether a write of this process found the session ended: it stays
    /// ended, so the API refuses its token at once (401, as the write would).
    pub fn session_known_ended(&self, session_id: Uuid) -> bool {
        self.ended_sessions.contains(session_id)
    }

    /// Runs one command in its own transaction (no group commit).
    pub(crate) async fn execute_direct(
        &self,
        envelope: &CommandEnvelope,
        command: LedgerCommand,
        render: RenderRejection,
    ) -> Result<Outcome, CommandError> {
        // A hold command checks the session in the read after its locks.
        if !crate::payments::is_hold_command(&command) {
            self.check_unchecked_session(envelope).await?;
        }
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
        let decided = if crate::payments::is_hold_command(command) {
            // The key's lock and lookup come with the accounts'.
            match crate::payments::decide_hold(&mut tx, envelope, command.clone()).await? {
                AfterLocks::Refused(check) => {
                    let refusal = check.refusal().unwrap_or(CommandError::SessionEnded);
                    return Err(self.refused_session(envelope.unchecked_session.unwrap_or_default(), refusal));
                }
                AfterLocks::Recorded(previous) => return replay(previous, envelope),
                AfterLocks::Decided(decided) => decided,
            }
        } else {
            idempotency::lock_key(&mut tx, envelope.actor, &envelope.idempotency_key).await?;
            if let Some(previous) = idempotency::find(&mut tx, envelope.actor, &envelope.idempotency_key).await? {
                return replay(previous, envelope);
            }
            decide(&mut tx, envelope.actor, command.clone(), &self.fees).await?
        };
        let command_id = command_id_for(envelope);
        let (status, body, position) = match decided {
            Ok(Decision { appends, mut body, status, effect, items }) => {
                let metadata = EventMetadata {
                    command_id: Some(command_id),
                    correlation_id: Some(envelope.correlation_id.unwrap_or(command_id)),
                    causation_id: envelope.causation_id,
                    actor_id: Some(envelope.actor),
                    recorded_at: Utc::now(),
                    client_ip: envelope.client.ip.clone(),
                    user_agent: envelope.client.user_agent.clone(),
                };
                let position = store::append(&mut tx, &appends, &metadata, &self.event_mac).await?;
                if let Some(effect) = effect {
                    apply_effect(&mut tx, effect).await?;
                }
                record_items(&mut tx, envelope.actor, items, position, &mut body).await?;
                body["position"] = json!(position);
                (status, body, position)
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
        self.committed(position);
        Ok(Outcome { status, body, replayed: false, position })
    }

    /// A batch whose items stand alone: each is a transfer under its own key
    /// (one failing does not stop the others), and the combined answer is
    /// recorded under the request's key, which is held for the duration.
    pub async fn execute_each(
        &self,
        envelope: &CommandEnvelope,
        items: Vec<crate::batch::BatchItem>,
        render: RenderRejection,
    ) -> Result<Outcome, CommandError> {
        // Each item gives its place back as it commits (its transaction
        // recorded its position first).
        let mut admitted = match &self.read_side_gate {
            Some(gate) => Some(gate.admit(items.len()).await),
            None => None,
        };
        self.check_unchecked_session(envelope).await?;
        let mut tx = self.pool.begin().await?;
        idempotency::lock_key(&mut tx, envelope.actor, &envelope.idempotency_key).await?;
        if let Some(previous) = idempotency::find(&mut tx, envelope.actor, &envelope.idempotency_key).await? {
            return replay(previous, envelope);
        }
        let mut results = Vec::with_capacity(items.len());
        let mut last = None;
        for item in items {
            let item_envelope = CommandEnvelope {
                actor: envelope.actor,
                idempotency_key: item.key.clone(),
                request_hash: item.request_hash(),
                correlation_id: envelope.correlation_id,
                client: envelope.client.clone(),
                causation_id: None,
                unchecked_session: None,
            };
            let command = LedgerCommand::Transfer {
                from_account: item.from_account,
                to_account: item.to_account,
                amount: item.amount.clone(),
                reference: item.reference.clone(),
            };
            // Each item in a transaction of its own, never through group
            // commit: this batch holds the request's key while its items
            // run, and a transfer under that key waiting in a group would
            // hold a writer the items needed (with one writer, every
            // transfer of the instance stalled until the time limit).
            let executed = self.execute_direct(&item_envelope, command, render).await;
            if let Some(admitted) = admitted.as_mut() {
                admitted.release(1);
            }
            let result = match executed {
                Ok(outcome) => {
                    last = outcome.position.max(last);
                    json!({ "key": item.key, "status": outcome.status, "body": outcome.body, "replayed": outcome.replayed })
                }
                Err(CommandError::IdempotencyKeyReuse) => json!({
                    "key": item.key,
                    "status": 422,
                    "body": { "type": "/problems/idempotency-key-reuse", "status": 422,
                              "detail": "this item's key was already used for a different request" },
                    "replayed": false
                }),
                Err(e) => return Err(e),
            };
            results.push(result);
        }
        let body = json!({ "atomic": false, "results": results, "position": last });
        idempotency::record(
            &mut tx,
            envelope.actor,
            &envelope.idempotency_key,
            Uuid::now_v7(),
            &envelope.request_hash,
            200,
            &body,
            last,
        )
        .await?;
        tx.commit().await?;
        Ok(Outcome { status: 200, body, replayed: false, position: last })
    }

    /// The recorded outcome of a key, for a client that lost the answer.
    pub async fn recorded_outcome(&self, actor: Uuid, key: &str) -> Result<Option<CommandRecord>, CommandError> {
        let mut conn = self.pool.acquire().await?;
        Ok(idempotency::find(&mut conn, actor, key).await?)
    }
}

/// A command's id: derived from the key for commands the system sends in
/// reaction to an event (so a redelivery is the same command), else new.
pub(crate) fn command_id_for(envelope: &CommandEnvelope) -> Uuid {
    match envelope.causation_id {
        Some(_) => Uuid::new_v5(&COMMAND_ID_NAMESPACE, envelope.idempotency_key.as_bytes()),
        None => Uuid::now_v7(),
    }
}

fn replay(previous: CommandRecord, envelope: &CommandEnvelope) -> Result<Outcome, CommandError> {
    if previous.request_hash != envelope.request_hash {
        return Err(CommandError::IdempotencyKeyReuse);
    }
    Ok(Outcome { status: previous.status as u16, body: previous.response, replayed: true, position: previous.position })
}

pub(crate) async fn account_state(
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

/// Debits take (class, `lock_key(account)`) exclusively; public so tests can
/// hold an account's lock as a concurrent writer would.
pub const ACCOUNT_LOCK_CLASS: i32 = 0x4C45_4447;
/// Freezes take this lock exclusively, credits share it: a credit decided
/// before a freeze commits first, one decided after sees the freeze. Nobody
/// waits for the debit lock while holding this one, so the two cannot deadlock.
pub(crate) const ACCOUNT_STATUS_LOCK_CLASS: i32 = 0x4C45_4448;

/// An account's advisory lock key (with `ACCOUNT_LOCK_CLASS` or the status class); public for the
/// same reason as the class.
pub fn lock_key(account_id: Uuid) -> i32 {
    let (hi, lo) = account_id.as_u64_pair();
    let folded = hi ^ lo;
    (folded ^ (folded >> 32)) as u32 as i32
}

async fn lock_status(conn: &mut PgConnection, account_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(ACCOUNT_STATUS_LOCK_CLASS)
        .bind(lock_key(account_id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(crate) async fn lock_status_shared(conn: &mut PgConnection, account_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
        .bind(ACCOUNT_STATUS_LOCK_CLASS)
        .bind(lock_key(account_id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Serialises debits of one account across every instance: the loser of a
/// race waits here instead of failing its optimistic append.
pub(crate) async fn lock_account(conn: &mut PgConnection, account_id: Uuid) -> Result<(), sqlx::Error> {
    // The two-key form lives in a lock space apart from the idempotency locks.
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(ACCOUNT_LOCK_CLASS)
        .bind(lock_key(account_id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Loads what a command needs and decides it. `Ok(Err(_))` is a domain rejection.
async fn decide(
    conn: &mut PgConnection,
    actor: Uuid,
    command: LedgerCommand,
    fees: &FeeSchedule,
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
                Decision::created(
                    vec![StreamAppend { stream_id: account_stream(account_id), expected_version: 0, events }],
                    body,
                )
            }))
        }
        LedgerCommand::Deposit { account_id, amount, reference } => {
            let amount = match Amount::parse("amount", &amount) {
                Ok(a) => a,
                Err(rejection) => return Ok(Err(rejection)),
            };
            lock_status_shared(conn, account_id).await?;
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
                    fee: None,
                },
            );
            Ok(decided.map(|events| {
                // The debit side is a system account: no invariant to guard, so
                // the movement gets its own stream and never contends.
                appends.push(StreamAppend { stream_id: transfer_stream(transfer_id), expected_version: 0, events });
                Decision::created(appends, json!({ "transfer_id": transfer_id }))
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
            let fee = fees.rule(TransferKind::Withdrawal);
            if fee.is_some() {
                appends.extend(open_fee_account_if_missing(conn, currency).await?);
            }
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
                    fee,
                },
            );
            Ok(decided.map(|events| {
                let body = movement_body(transfer_id, &events);
                appends.push(StreamAppend { stream_id: account_stream(account_id), expected_version: version, events });
                Decision::created(appends, body)
            }))
        }
        LedgerCommand::Transfer { from_account, to_account, amount, reference } => {
            let amount = match Amount::parse("amount", &amount) {
                Ok(a) => a,
                Err(rejection) => return Ok(Err(rejection)),
            };
            lock_account(conn, from_account).await?;
            let (from, version) = account_state(conn, from_account, true).await?;
            lock_status_shared(conn, to_account).await?;
            let (to, _) = account_state(conn, to_account, false).await?;
            let fee = fees.rule(TransferKind::Transfer);
            let mut appends = match (fee, from.currency()) {
                (Some(_), Some(currency)) => open_fee_account_if_missing(conn, currency).await?,
                _ => vec![],
            };
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
                    fee,
                },
            );
            Ok(decided.map(|events| {
                let body = movement_body(transfer_id, &events);
                appends.push(StreamAppend {
                    stream_id: account_stream(from_account),
                    expected_version: version,
                    events,
                });
                Decision::created(appends, body)
            }))
        }
        LedgerCommand::PlaceHold { .. }
        | LedgerCommand::CaptureHold { .. }
        | LedgerCommand::ReleaseHold { .. }
        | LedgerCommand::ExpireHold { .. }
        | LedgerCommand::PlaceOrder { .. }
        | LedgerCommand::PayOrder { .. }
        | LedgerCommand::AcceptOrder { .. }
        | LedgerCommand::CancelOrder { .. }
        | LedgerCommand::RefundOrder { .. } => crate::payments::decide(conn, actor, command).await,
        LedgerCommand::BlockUser { user_id, reason } => {
            if user_id == actor {
                return Ok(Err(DomainError::validation("user_id", "is you: an admin cannot block themselves")));
            }
            let decided = user_change(conn, user_id, UserCommand::Block { user_id, reason }).await?;
            Ok(decided.map(|(appends, _)| Decision {
                appends,
                body: json!({ "user_id": user_id, "blocked": true }),
                status: 200,
                effect: Some(Effect::Blocked(user_id, true)),
                items: vec![],
            }))
        }
        LedgerCommand::UnblockUser { user_id, reason } => {
            let decided = user_change(conn, user_id, UserCommand::Unblock { user_id, reason }).await?;
            Ok(decided.map(|(appends, _)| Decision {
                appends,
                body: json!({ "user_id": user_id, "blocked": false }),
                status: 200,
                effect: Some(Effect::Blocked(user_id, false)),
                items: vec![],
            }))
        }
        LedgerCommand::ChangeRole { user_id, role, reason } => {
            if user_id == actor {
                return Ok(Err(DomainError::validation("user_id", "is you: an admin cannot change their own role")));
            }
            let decided = user_change(conn, user_id, UserCommand::ChangeRole { user_id, role, reason }).await?;
            Ok(decided.map(|(appends, _)| Decision {
                appends,
                body: json!({ "user_id": user_id, "role": role }),
                status: 200,
                effect: Some(Effect::Role(user_id, role)),
                items: vec![],
            }))
        }
        LedgerCommand::TransferBatch { items } => {
            Ok(crate::batch::decide(conn, actor, items, fees).await?.map(|(mut decision, records)| {
                decision.items = records;
                decision
            }))
        }
        LedgerCommand::ForgetUser { user_id, reason } => {
            if user_id == actor {
                return Ok(Err(DomainError::validation("user_id", "is you: an admin cannot forget themselves")));
            }
            let decided = user_change(conn, user_id, UserCommand::Forget { user_id, reason }).await?;
            Ok(decided.map(|(appends, _)| Decision {
                appends,
                body: json!({ "user_id": user_id, "forgotten": true }),
                status: 200,
                effect: Some(Effect::Forgotten(user_id)),
                items: vec![],
            }))
        }
        LedgerCommand::FreezeAccount { account_id, reason } => {
            let decided = account_change(conn, account_id, AccountCommand::Freeze { account_id, reason }).await?;
            Ok(decided.map(|appends| Decision {
                appends,
                body: json!({ "account_id": account_id, "frozen": true }),
                status: 200,
                effect: None,
                items: vec![],
            }))
        }
        LedgerCommand::UnfreezeAccount { account_id, reason } => {
            let decided = account_change(conn, account_id, AccountCommand::Unfreeze { account_id, reason }).await?;
            Ok(decided.map(|appends| Decision {
                appends,
                body: json!({ "account_id": account_id, "frozen": false }),
                status: 200,
                effect: None,
                items: vec![],
            }))
        }
    }
}

/// Decides a change to a user's own stream; returns the append and the new state.
pub(crate) async fn user_change(
    conn: &mut PgConnection,
    user_id: Uuid,
    command: UserCommand,
) -> Result<Result<(Vec<StreamAppend>, UserState), DomainError>, StoreError> {
    let stream_id = user_stream(user_id);
    let (history, version) = store::load_stream(conn, &stream_id).await?;
    let state = history.iter().fold(UserState::default(), user::evolve);
    Ok(user::decide(&state, command).map(|events| {
        let next = events.iter().fold(state, user::evolve);
        (vec![StreamAppend { stream_id, expected_version: version, events }], next)
    }))
}

/// Decides a freeze or unfreeze under the account's debit lock, so it orders
/// with every debit of the account.
async fn account_change(
    conn: &mut PgConnection,
    account_id: Uuid,
    command: AccountCommand,
) -> Result<Result<Vec<StreamAppend>, DomainError>, StoreError> {
    lock_account(conn, account_id).await?;
    lock_status(conn, account_id).await?;
    let (state, version) = account_state(conn, account_id, true).await?;
    Ok(account::decide(&state, command)
        .map(|events| vec![StreamAppend { stream_id: account_stream(account_id), expected_version: version, events }]))
}

/// Records each new batch item under its own key, at the batch's position,
/// and puts that position into the batch's answer.
async fn record_items(
    conn: &mut PgConnection,
    actor: Uuid,
    items: Vec<crate::batch::ItemRecord>,
    position: Option<i64>,
    body: &mut Value,
) -> Result<(), sqlx::Error> {
    let responses: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut response = item.body.clone();
            response["position"] = json!(position);
            response
        })
        .collect();
    let rows: Vec<crate::group_commit::CommandRow<'_>> = items
        .iter()
        .zip(&responses)
        .map(|(item, response)| crate::group_commit::CommandRow {
            user_id: actor,
            key: &item.key,
            command_id: Uuid::now_v7(),
            request_hash: &item.request_hash,
            status: 201,
            response,
            position,
        })
        .collect();
    crate::group_commit::record_many(conn, &rows).await?;
    if let Some(results) = body.get_mut("results").and_then(Value::as_array_mut) {
        for result in results.iter_mut().filter(|r| r["replayed"] == false) {
            result["body"]["position"] = json!(position);
        }
    }
    Ok(())
}

/// Keeps the write-side identity cache in step with the user stream.
async fn apply_effect(conn: &mut PgConnection, effect: Effect) -> Result<(), sqlx::Error> {
    match effect {
        Effect::Role(user_id, role) => {
            sqlx::query("UPDATE credentials SET role = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(role.as_str())
                .execute(&mut *conn)
                .await?;
        }
        Effect::Blocked(user_id, blocked) => {
            sqlx::query("UPDATE credentials SET blocked = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(blocked)
                .execute(&mut *conn)
                .await?;
            if blocked {
                crate::identity::revoke_sessions(conn, user_id, None, "user-blocked").await?;
            }
        }
        Effect::Forgotten(user_id) => {
            // The key goes, and with it every sealed personal field. The login
            // row keeps no address and no password: nobody logs in as them.
            sqlx::query("DELETE FROM personal_data_keys WHERE user_id = $1").bind(user_id).execute(&mut *conn).await?;
            // The throttle names the address too.
            sqlx::query(
                "DELETE FROM login_throttle WHERE subject = 'email:' || (SELECT email FROM credentials WHERE user_id = $1)",
            )
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
            sqlx::query("INSERT INTO forgotten_users (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(user_id)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "UPDATE credentials SET email = 'erased-' || user_id || '@erased.invalid', password_hash = '!',
                     blocked = true WHERE user_id = $1",
            )
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
            crate::identity::revoke_sessions(conn, user_id, None, "user-forgotten").await?;
        }
    }
    Ok(())
}

/// The body of a movement's answer: its id, and its fee as an entry of its own.
pub(crate) fn movement_body(transfer_id: Uuid, events: &[Event]) -> Value {
    let mut body = json!({ "transfer_id": transfer_id });
    if let Some(Event::TransferRecorded(fee)) =
        events.iter().find(|e| matches!(e, Event::TransferRecorded(t) if t.kind == TransferKind::Fee))
    {
        body["fee"] = json!({ "transfer_id": fee.transfer_id, "amount": fee.amount, "account": fee.to_account });
    }
    body
}

/// A currency's fee account is opened by the first movement that may pay a fee.
pub(crate) async fn open_fee_account_if_missing(
    conn: &mut PgConnection,
    currency: ledger_domain::Currency,
) -> Result<Vec<StreamAppend>, StoreError> {
    let id = account::fee_account_id(currency);
    let (state, _) = account_state(conn, id, false).await?;
    if state.opened.is_some() {
        return Ok(vec![]);
    }
    Ok(match account::decide(&state, AccountCommand::OpenFeeAccount { currency }) {
        Ok(events) => vec![StreamAppend { stream_id: account_stream(id), expected_version: 0, events }],
        Err(_) => vec![],
    })
}

/// The first movement in a currency opens its system account in the same append.
pub(crate) fn open_system_if_missing(
    system: &mut AccountState,
    currency: ledger_domain::Currency,
) -> Vec<StreamAppend> {
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
