//! Group commit for transfers and holds: concurrent `POST /v1/transfers`
//! commands, and holds' placements, captures and releases, are decided
//! together and written in one PostgreSQL transaction, with a handful of
//! set-based statements per group instead of a dozen round trips and a commit
//! per command. A hold command locks and reads what a transfer does (the
//! payer's account for debits, the payee's shared) and appends to the payer's
//! stream; a capture or release finds its accounts from the hold's placement,
//! which never changes, before the locks.
//!
//! Every guarantee of the single-command path holds per command:
//! - idempotency: each (user, key) is locked and looked up, and its outcome
//!   (success or rejection) recorded in the group's transaction; a key appears
//!   at most once per group, a duplicate waits for the next group;
//! - no overdraft: debited accounts are locked (advisory locks, sorted, so
//!   groups and single commands cannot deadlock), and each command is decided
//!   against the state the earlier commands of the group left;
//! - optimistic concurrency stays the safety net: events are appended at the
//!   expected stream versions, and a group that fails for any reason (a
//!   version conflict with another instance, a deadlock) is rolled back and
//!   its commands run one by one on the single-command path.
//!
//! The write side also keeps the state of recently touched accounts. For a
//! debit it is a lower bound, never an over-estimate: everything that lowers
//! an account's available funds (debits, holds, freezes) is appended to the
//! account's own stream under its lock, so a cached state at the stream's
//! current version has missed at most credits. A debit allowed by a lower
//! bound is allowed by the truth; a debit it refuses is decided again on a
//! fresh fold. For a credit, what matters is whether the account is open and
//! not frozen: freezes are appended to its own stream under its status lock,
//! which the group holds shared, and the stream's later events bring the
//! cached state forward. Cached versions never exceed the stream's head: the
//! cache is written only after its group committed, and the log is
//! append-only.

use crate::idempotency::{self, CommandRecord};
use crate::identity::{credential_check, CredentialCheck};
use crate::ledger::{CommandEnvelope, CommandError, Decision, Ledger, LedgerCommand, Outcome, RenderRejection};
use crate::store::{self, account_stream, stored_event, EventMetadata, EventRows, StoreError, StreamAppend};
use chrono::{DateTime, Utc};
use ledger_domain::account::{self, AccountState, MoveMoney};
use ledger_domain::events::TransferKind;
use ledger_domain::money::Amount;
use ledger_domain::{DomainError, Event};
use serde_json::{json, Value};
use sqlx::{Connection, FromRow, PgConnection, PgPool, Row};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use uuid::Uuid;

/// Most commands decided in one transaction.
const MAX_GROUP: usize = 256;
/// Cached account states kept at most; the cache is cleared beyond it.
const MAX_CACHED_ACCOUNTS: usize = 200_000;

/// A command waiting for its group.
pub(crate) struct Pending {
    envelope: CommandEnvelope,
    command: Grouped,
    render: RenderRejection,
    reply: oneshot::Sender<Result<Outcome, CommandError>>,
    /// When it was queued: the trace line reports how long a group's commands waited.
    queued: Instant,
}

#[derive(Clone, Debug)]
struct Transfer {
    from_account: Uuid,
    to_account: Uuid,
    amount: String,
    reference: Option<String>,
}

/// What a group decides: transfers, and the placements, captures and
/// releases of holds, which lock and read what a transfer does (the payer's
/// account for debits, the payee's shared) and append to the payer's stream.
#[derive(Clone, Debug)]
enum Grouped {
    Transfer(Transfer),
    /// `PlaceHold`, `CaptureHold` or `ReleaseHold`.
    Hold(LedgerCommand),
}

impl Grouped {
    fn command(&self) -> LedgerCommand {
        match self {
            Grouped::Transfer(t) => LedgerCommand::Transfer {
                from_account: t.from_account,
                to_account: t.to_account,
                amount: t.amount.clone(),
                reference: t.reference.clone(),
            },
            Grouped::Hold(command) => command.clone(),
        }
    }

    /// The account it debits and the one it credits; for a capture or
    /// release, its hold's, when the hold was placed.
    fn parties(&self, holds: &HashMap<Uuid, (Uuid, Uuid)>) -> Option<(Uuid, Uuid)> {
        match self {
            Grouped::Transfer(t) => Some((t.from_account, t.to_account)),
            Grouped::Hold(command) => crate::payments::named_parties(command)
                .or_else(|| crate::payments::named_hold(command).and_then(|hold| holds.get(&hold).copied())),
        }
    }
}

/// An account's write-side state at its stream's version. `full` states have
/// every debit (their balance is a lower bound); the others know the opening
/// and freezes only, enough for the credit side.
#[derive(Clone)]
pub(crate) struct Known {
    pub(crate) state: AccountState,
    pub(crate) version: i64,
    full: bool,
}

#[derive(Clone, Default)]
pub(crate) struct AccountCache {
    known: Arc<Mutex<HashMap<Uuid, Known>>>,
}

impl AccountCache {
    fn get(&self, ids: impl Iterator<Item = Uuid>) -> HashMap<Uuid, Known> {
        let Ok(known) = self.known.lock() else { return HashMap::new() };
        ids.filter_map(|id| known.get(&id).map(|k| (id, k.clone()))).collect()
    }

    fn put(&self, states: HashMap<Uuid, Known>) {
        if let Ok(mut known) = self.known.lock() {
            if known.len() + states.len() > MAX_CACHED_ACCOUNTS {
                known.clear();
            }
            known.extend(states);
        }
    }

    fn forget(&self, ids: impl Iterator<Item = Uuid>) {
        if let Ok(mut known) = self.known.lock() {
            for id in ids {
                known.remove(&id);
            }
        }
    }
}

/// The queue the writers take groups from.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

/// How long the writer must have been on one group before a standby writer
/// takes the next one.
const STANDBY_AFTER: Duration = Duration::from_millis(20);
/// How often a standby writer looks.
const STANDBY_POLL: Duration = Duration::from_millis(5);

/// When the writer started the group it is on, if it is on one.
#[derive(Default)]
struct Writing {
    since: Mutex<Option<Instant>>,
}

impl Writing {
    fn set(&self, since: Option<Instant>) {
        if let Ok(mut s) = self.since.lock() {
            *s = since;
        }
    }

    fn stuck(&self) -> bool {
        self.since.lock().ok().and_then(|s| *s).is_some_and(|since| since.elapsed() >= STANDBY_AFTER)
    }
}

impl GroupCommit {
    /// Starts one writer and `writers - 1` standby writers. The writer takes
    /// what is queued (up to a group), writes it, and comes back: a busy
    /// server forms large groups, an idle one commits each command at once.
    /// One writer makes the largest groups (the fewest transactions per
    /// transfer: +7.5% at the bench's peak, BENCHMARKS.md), but a group
    /// that is slow in PostgreSQL (waiting on an account lock an atomic
    /// batch holds, on another transaction's insert, a cold fold of an
    /// account with a long history) would hold up every command behind it; so a standby takes the queue's next group once
    /// the writer has been on one for `STANDBY_AFTER`.
    pub(crate) fn start(ledger: Ledger, writers: usize) -> GroupCommit {
        let (queue, receiver) = mpsc::channel::<Pending>(MAX_GROUP * writers.max(1) * 4);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let cache = AccountCache::default();
        let writing = Arc::new(Writing::default());
        {
            let (receiver, ledger, cache, writing) = (receiver.clone(), ledger.clone(), cache.clone(), writing.clone());
            tokio::spawn(async move {
                let mut deferred: Vec<Pending> = Vec::new();
                let mut held = HeldConnection::default();
                while let Some(group) = next_group(&receiver, &mut deferred, Waiting::Yes).await {
                    writing.set(Some(Instant::now()));
                    write_group(&ledger, &cache, &mut held, group).await;
                    writing.set(None);
                }
            });
        }
        for _ in 1..writers.max(1) {
            let (receiver, ledger, cache, writing) = (receiver.clone(), ledger.clone(), cache.clone(), writing.clone());
            tokio::spawn(async move {
                let mut deferred: Vec<Pending> = Vec::new();
                let mut held = HeldConnection::default();
                loop {
                    tokio::time::sleep(STANDBY_POLL).await;
                    held.close_if_unused_for(STANDBY_HELD_IDLE).await;
                    if !writing.stuck() && deferred.is_empty() {
                        // Gone with the queue (every sender dropped).
                        if receiver.try_lock().is_ok_and(|r| r.is_closed() && r.is_empty()) {
                            break;
                        }
                        continue;
                    }
                    let Some(group) = next_group(&receiver, &mut deferred, Waiting::No).await else { break };
                    if !group.is_empty() {
                        write_group(&ledger, &cache, &mut held, group).await;
                    }
                }
            });
        }
        GroupCommit { queue }
    }

    /// Queues a transfer or a hold command and waits for its outcome. `None`
    /// for any other command (the caller runs it directly).
    pub(crate) async fn submit(
        &self,
        envelope: &CommandEnvelope,
        command: &LedgerCommand,
        render: RenderRejection,
    ) -> Option<Result<Outcome, CommandError>> {
        let command = match command {
            LedgerCommand::Transfer { from_account, to_account, amount, reference } => Grouped::Transfer(Transfer {
                from_account: *from_account,
                to_account: *to_account,
                amount: amount.clone(),
                reference: reference.clone(),
            }),
            hold if crate::payments::is_hold_command(hold) => Grouped::Hold(hold.clone()),
            _ => return None,
        };
        let (reply, answer) = oneshot::channel();
        let pending = Pending { envelope: envelope.clone(), command, render, reply, queued: Instant::now() };
        if self.queue.send(pending).await.is_err() {
            return None;
        }
        answer.await.ok()
    }
}

/// Takes the deferred commands and whatever else is queued, one per (user,
/// key); waits only when there is nothing at all, and then only with
/// `Waiting::Yes` (else the group is empty). `None` once the queue is closed.
async fn next_group(
    receiver: &tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    deferred: &mut Vec<Pending>,
    waiting: Waiting,
) -> Option<Vec<Pending>> {
    let mut group: Vec<Pending> = Vec::new();
    let mut keys: HashSet<(Uuid, String)> = HashSet::new();
    let mut later = Vec::new();
    for p in deferred.drain(..) {
        if keys.insert((p.envelope.actor, p.envelope.idempotency_key.clone())) {
            group.push(p);
        } else {
            later.push(p);
        }
    }
    // With deferred commands in hand, never wait for the queue: another
    // writer may be holding it while it waits for new commands.
    let mut receiver = if group.is_empty() && waiting == Waiting::Yes {
        let mut receiver = receiver.lock().await;
        let first = receiver.recv().await?;
        keys.insert((first.envelope.actor, first.envelope.idempotency_key.clone()));
        group.push(first);
        receiver
    } else if group.is_empty() {
        // A standby: whoever holds the queue waits on it, so it is empty.
        let Ok(mut receiver) = receiver.try_lock() else { return Some(group) };
        match receiver.try_recv() {
            Ok(first) => {
                keys.insert((first.envelope.actor, first.envelope.idempotency_key.clone()));
                group.push(first);
            }
            Err(mpsc::error::TryRecvError::Empty) => return Some(group),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
        }
        receiver
    } else {
        match receiver.try_lock() {
            Ok(receiver) => receiver,
            Err(_) => {
                *deferred = later;
                return Some(group);
            }
        }
    };
    while group.len() < MAX_GROUP {
        let Ok(p) = receiver.try_recv() else { break };
        if keys.insert((p.envelope.actor, p.envelope.idempotency_key.clone())) {
            group.push(p);
        } else {
            later.push(p);
        }
    }
    drop(receiver);
    *deferred = later;
    Some(group)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Yes,
    No,
}

/// How long a writer's connection may sit unused before it is pinged.
const HELD_IDLE: Duration = Duration::from_secs(1);
/// A standby's connection unused for this long is closed.
const STANDBY_HELD_IDLE: Duration = Duration::from_secs(30);
/// The longest a writer waits to open a connection (the pool's acquire
/// timeout), and for a ping or a `BEGIN` on a kept one: a connection cut off
/// by a failover or a partition would otherwise hang until TCP gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A writer's own connection (`application_name` `ledger-writer`), opened
/// with the pool's settings and kept from one group to the next. A
/// connection from the pool is pinged when it is handed out and again when
/// it comes back: two round trips per group, one of them on the path of
/// every command in it. The ping guards against connections that died
/// while idle; here that guard is kept by pinging a connection left unused
/// for `HELD_IDLE`, by retrying on a fresh one a group whose `BEGIN` failed
/// on a kept one, and by time limits on opening, pinging and `BEGIN`. A
/// connection that failed other than with an error from PostgreSQL (an
/// I/O error, a time limit) is dropped: it belongs to no pool, so dropping
/// it closes it, and PostgreSQL rolls back whatever it had open. Besides
/// the pool, an instance holds up to one such connection per writer.
#[derive(Default)]
struct HeldConnection {
    conn: Option<PgConnection>,
    used: Option<Instant>,
}

impl HeldConnection {
    /// The kept connection, or a fresh one; and whether it was kept.
    async fn take(&mut self, pool: &PgPool) -> Result<(&mut PgConnection, bool), sqlx::Error> {
        if let (Some(conn), Some(used)) = (self.conn.as_mut(), self.used) {
            if used.elapsed() >= HELD_IDLE && !matches!(timeout(CHECK_TIMEOUT, conn.ping()).await, Ok(Ok(()))) {
                self.conn = None;
            }
        }
        let kept = self.conn.is_some();
        if self.conn.is_none() {
            let options = pool.connect_options().as_ref().clone().application_name("ledger-writer");
            let conn = timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
            self.conn = Some(conn);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok((conn, kept)),
            None => Err(sqlx::Error::PoolClosed),
        }
    }

    /// After a group: the connection goes on unless it failed other than
    /// with an error PostgreSQL reported (after which the transaction's
    /// rollback is already queued on it).
    fn done(&mut self, failure: Option<&StoreError>) {
        self.used = Some(Instant::now());
        let keep = match failure {
            None | Some(StoreError::Conflict) | Some(StoreError::Database(sqlx::Error::Database(_))) => true,
            Some(_) => false,
        };
        if !keep {
            self.conn = None;
        }
    }

    fn drop_connection(&mut self) {
        self.conn = None;
    }

    async fn close_if_unused_for(&mut self, idle: Duration) {
        if self.used.is_some_and(|used| used.elapsed() >= idle) {
            if let Some(conn) = self.conn.take() {
                let _ = conn.close().await;
            }
            self.used = None;
        }
    }
}

/// Where a group's transaction failed.
enum GroupFailure {
    /// At `BEGIN`, on a connection kept from an earlier group: it may have
    /// died while idle; the group is tried once more on a fresh one.
    BeginOnKept(StoreError),
    Store(StoreError),
}

impl From<StoreError> for GroupFailure {
    fn from(e: StoreError) -> Self {
        GroupFailure::Store(e)
    }
}

impl From<sqlx::Error> for GroupFailure {
    fn from(e: sqlx::Error) -> Self {
        GroupFailure::Store(e.into())
    }
}

/// Writes a group; on any failure of the transaction, runs each of its
/// commands alone. A command whose key another transaction holds leaves the
/// group and runs alone too, so no group waits on a key (a running
/// non-atomic batch holds its request key for as long as its items take).
async fn write_group(ledger: &Ledger, cache: &AccountCache, held: &mut HeldConnection, group: Vec<Pending>) {
    let started = Instant::now();
    let waited = group.iter().map(|p| started.duration_since(p.queued)).max().unwrap_or_default();
    // Where the group's holds were placed, as its transaction found them.
    let mut holds = HashMap::new();
    let mut result = try_group(ledger, cache, held, &group, &mut holds).await;
    if let Err(GroupFailure::BeginOnKept(e)) = &result {
        tracing::debug!(error = %e, "a kept connection failed at BEGIN; the group goes on a fresh one");
        held.drop_connection();
        result = try_group(ledger, cache, held, &group, &mut holds).await;
    }
    let accounts: Vec<Uuid> =
        group.iter().filter_map(|p| p.command.parties(&holds)).flat_map(|(from, to)| [from, to]).collect();
    let result = result.map_err(|failure| match failure {
        GroupFailure::BeginOnKept(e) | GroupFailure::Store(e) => e,
    });
    held.done(result.as_ref().err());
    match result {
        Ok(outcomes) => {
            tracing::trace!(
                size = outcomes.len(),
                micros = started.elapsed().as_micros() as u64,
                waited_micros = waited.as_micros() as u64,
                "group committed"
            );
            for (pending, outcome) in group.into_iter().zip(outcomes) {
                match outcome {
                    Some(outcome) => {
                        let _ = pending.reply.send(outcome);
                    }
                    None => run_alone(ledger, pending),
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, size = group.len(), "group commit failed; running its commands one by one");
            cache.forget(accounts.into_iter());
            for pending in group {
                run_alone(ledger, pending);
            }
        }
    }
}

/// Runs a command on the single-command path, in a task of its own: the
/// writer goes on to the next group.
fn run_alone(ledger: &Ledger, pending: Pending) {
    let ledger = ledger.clone();
    tokio::spawn(async move {
        let outcome = ledger.execute_direct(&pending.envelope, pending.command.command(), pending.render).await;
        let _ = pending.reply.send(outcome);
    });
}

/// What became of one command of the group before the append.
enum Decided {
    /// Its key is held by another transaction: it leaves the group.
    Alone,
    Answered(Result<Outcome, CommandError>),
    Rejected {
        command_id: Uuid,
        status: u16,
        body: Value,
    },
    Accepted {
        command_id: Uuid,
        status: u16,
        body: Value,
        first_event: usize,
        events: usize,
    },
}

/// A command the group still has to decide.
enum ToDecide<'a> {
    Transfer(&'a Transfer, Amount),
    Hold(&'a LedgerCommand),
}

async fn try_group(
    ledger: &Ledger,
    cache: &AccountCache,
    held: &mut HeldConnection,
    group: &[Pending],
    holds: &mut HashMap<Uuid, (Uuid, Uuid)>,
) -> Result<Vec<Option<Result<Outcome, CommandError>>>, GroupFailure> {
    let (conn, kept) = held.take(&ledger.pool).await?;
    let began = timeout(CHECK_TIMEOUT, conn.begin()).await.unwrap_or(Err(sqlx::Error::PoolTimedOut));
    let mut tx = match began {
        Ok(tx) => tx,
        Err(e) if kept => return Err(GroupFailure::BeginOnKept(e.into())),
        Err(e) => return Err(e.into()),
    };
    let conn: &mut PgConnection = &mut tx;
    // Phase times, for the trace line a profile reads (locks, read, decide, append, commit).
    let mut phases = Phases::start();

    // 1. Every lock in one statement (once the holds' accounts are known, below), in
    // the one order every path takes them:
    // the keys, then debited accounts exclusively, then credited ones shared
    // (a freeze waits for them), each class sorted. Keys are only tried: one
    // held elsewhere sends its command off to run alone. The accounts of a
    // command that turns out to be a replay, or leaves, are locked too:
    // harmless, and it saves the group two round trips (a lookup must follow
    // the locks in a statement of its own, whose snapshot sees what the
    // previous holders committed).
    // A capture or release names its hold only: the accounts come from the
    // hold's placement, which never changes, so it is read before the locks.
    let named: Vec<Uuid> = group
        .iter()
        .filter_map(|p| match &p.command {
            Grouped::Hold(command) => crate::payments::named_hold(command),
            Grouped::Transfer(_) => None,
        })
        .collect();
    *holds = crate::payments::holds_parties(conn, &named).await?;
    let parties: Vec<Option<(Uuid, Uuid)>> = group.iter().map(|p| p.command.parties(holds)).collect();
    let debited: BTreeSet<Uuid> = parties.iter().flatten().map(|(from, _)| *from).collect();
    let credited: BTreeSet<Uuid> =
        parties.iter().flatten().map(|(_, to)| *to).filter(|a| !debited.contains(a)).collect();
    let busy: HashSet<i64> = lock_group(
        conn,
        group.iter().map(|p| (p.envelope.actor, p.envelope.idempotency_key.as_str())),
        &debited,
        &credited,
        KeyLocks::Try,
    )
    .await?
    .busy
    .into_iter()
    .collect();
    phases.mark();
    // Everything the decisions need, in one statement after the locks: the
    // recorded outcomes, the versions of the streams the group appends to or
    // folds, and the accounts' states
    // (cached ones brought forward by their streams' later events, the
    // others folded from the log).
    let all: Vec<Uuid> = debited.iter().chain(credited.iter()).copied().collect();
    let mut states: HashMap<Uuid, Known> = cache.get(all.iter().copied());
    // A debited account needs a full state; a credit-side one will not do.
    states.retain(|id, known| known.full || !debited.contains(id));
    let cached: Vec<(Uuid, i64)> = states.iter().map(|(id, known)| (*id, known.version)).collect();
    // A cached credit-side state needs no version lookup (an index probe and
    // a heap fetch each): its stream's later events bring it to the head. A
    // debited account's version is read all the same, as a guard: the group
    // appends at it, and `UNIQUE (stream_id, stream_version)` would not see a
    // gap left by a cache that was somehow ahead of the log.
    let credit_cached: HashSet<Uuid> = states.keys().filter(|id| !debited.contains(id)).copied().collect();
    let versioned: Vec<Uuid> = all.iter().filter(|a| !credit_cached.contains(a)).copied().collect();
    let missing_full: Vec<Uuid> = debited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    let missing_opening: Vec<Uuid> = credited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    let users: Vec<Uuid> = group.iter().map(|p| p.envelope.actor).collect();
    let keys: Vec<&str> = group.iter().map(|p| p.envelope.idempotency_key.as_str()).collect();
    // Sessions the API left to this transaction: checked in the same read.
    // One row per distinct session: a group's commands mostly share a few.
    let mut sessions: Vec<(Uuid, Uuid)> = Vec::new();
    let mut checked: Vec<(usize, usize)> = Vec::new();
    let mut seen: HashMap<(Uuid, Uuid), usize> = HashMap::new();
    for (i, p) in group.iter().enumerate() {
        let Some(session) = p.envelope.unchecked_session else { continue };
        let at = *seen.entry((p.envelope.actor, session)).or_insert_with(|| {
            sessions.push((p.envelope.actor, session));
            sessions.len() - 1
        });
        checked.push((i, at));
    }
    let found = read_after_locks(
        conn,
        &ReadAfterLocks {
            users: &users,
            keys: &keys,
            accounts: &versioned,
            cached: &cached,
            full: &missing_full,
            opening: &missing_opening,
            sessions: &sessions,
        },
    )
    .await?;
    phases.mark();
    let mut refused: HashMap<usize, CommandError> = checked
        .into_iter()
        .filter_map(|(i, at)| {
            // One answer per pair was read; a missing one counts as ended.
            let refusal = found.sessions.get(at).copied().unwrap_or(CredentialCheck::Ended).refusal()?;
            let session = group[i].envelope.unchecked_session.unwrap_or_default();
            Some((i, ledger.refused_session(session, refusal)))
        })
        .collect();
    let previous = found.records;
    let versions = found.versions;
    // The database's clock, by which holds' expiries are decided.
    let now = found.now;
    for (id, version, event) in found.later {
        if let Some(known) = states.get_mut(&id) {
            known.state = account::evolve(std::mem::take(&mut known.state), &event);
            known.version = version;
        }
    }
    // Usable: a cached debited state brought exactly to its stream's
    // version (one that is ahead of it, or did not reach it, is folded again
    // below); a cached credit-side state, brought to its stream's head.
    states.retain(|id, known| credit_cached.contains(id) || versions.get(id).copied().unwrap_or(0) == known.version);
    let from_cache: HashSet<Uuid> = states.keys().copied().collect();
    states.extend(found.full);
    states.extend(found.opening);
    let refold_full: Vec<Uuid> = debited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    let refold_opening: Vec<Uuid> = credited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    states.extend(fold_again(conn, &refold_full, &refold_opening).await?);

    // 2. What is left to decide: a live session, not a replay, and (for a
    // transfer) an amount that parses; a hold command parses its own in its
    // decision. A refused session is answered before its key is looked at:
    // nothing is recorded under it.
    let mut decided: Vec<Option<Decided>> = Vec::with_capacity(group.len());
    let mut todo: Vec<(usize, ToDecide<'_>)> = Vec::new();
    for (i, p) in group.iter().enumerate() {
        if let Some(refusal) = refused.remove(&i) {
            decided.push(Some(Decided::Answered(Err(refusal))));
            continue;
        }
        let key = (p.envelope.actor, p.envelope.idempotency_key.as_str());
        if busy.contains(&idempotency::key_lock_id(key.0, key.1)) {
            decided.push(Some(Decided::Alone));
            continue;
        }
        if let Some(record) = previous.get(&(key.0, key.1.to_owned())) {
            decided.push(Some(Decided::Answered(replay(record, &p.envelope))));
            continue;
        }
        let transfer = match &p.command {
            Grouped::Transfer(transfer) => transfer,
            Grouped::Hold(command) => {
                todo.push((i, ToDecide::Hold(command)));
                decided.push(None);
                continue;
            }
        };
        match Amount::parse("amount", &transfer.amount) {
            Ok(amount) => {
                todo.push((i, ToDecide::Transfer(transfer, amount)));
                decided.push(None);
            }
            Err(rejection) => {
                let (status, body) = (p.render)(&rejection);
                decided.push(Some(Decided::Rejected { command_id: command_id(&p.envelope), status, body }));
            }
        }
    }

    // 4. Decide in order; each command sees what the earlier ones did.
    let fee = ledger.fees.rule(TransferKind::Transfer);
    let mut appends: Vec<(usize, StreamAppend)> = Vec::new();
    let mut fee_accounts_checked = BTreeSet::new();
    let mut reloaded: HashSet<Uuid> = HashSet::new();
    for (i, to_decide) in todo {
        let p = &group[i];
        let Some((payer, payee)) = parties[i] else {
            // A capture or release of a hold never placed: refused as not found.
            let ToDecide::Hold(command) = to_decide else {
                return Err(StoreError::Invariant("a transfer without accounts").into());
            };
            let actor = p.envelope.actor;
            let rejection = match crate::payments::decide_on_states(now, None, &states, actor, command.clone()) {
                Err(rejection) => rejection,
                Ok(_) => return Err(StoreError::Invariant("a hold command without accounts was accepted").into()),
            };
            let (status, body) = (p.render)(&rejection);
            decided[i] = Some(Decided::Rejected { command_id: command_id(&p.envelope), status, body });
            continue;
        };
        let decide_on = |states: &HashMap<Uuid, Known>| -> Result<Decision, DomainError> {
            match &to_decide {
                ToDecide::Transfer(t, amount) => {
                    let transfer_id = Uuid::now_v7();
                    let movement = MoveMoney {
                        transfer_id,
                        kind: TransferKind::Transfer,
                        initiated_by: p.envelope.actor,
                        from_account: t.from_account,
                        to_account: t.to_account,
                        amount: *amount,
                        reference: t.reference.clone(),
                        fee,
                    };
                    let events = decide(states, movement)?;
                    let body = movement_body(transfer_id, &events);
                    // Every debited account was loaded above (a missing one
                    // appends at 0, which its stream's head refuses).
                    let expected_version = states.get(&payer).map_or(0, |k| k.version);
                    let stream_id = account_stream(payer);
                    Ok(Decision::created(vec![StreamAppend { stream_id, expected_version, events }], body))
                }
                ToDecide::Hold(command) => crate::payments::decide_on_states(
                    now,
                    Some((payer, payee)),
                    states,
                    p.envelope.actor,
                    (*command).clone(),
                ),
            }
        };
        if let (ToDecide::Transfer(..), Some(_)) = (&to_decide, fee) {
            if let Some(currency) = states.get(&payer).and_then(|k| k.state.currency()) {
                if fee_accounts_checked.insert(currency.code()) {
                    for open in crate::ledger::open_fee_account_if_missing(conn, currency).await? {
                        appends.push((i, open));
                    }
                }
            }
        }
        let mut outcome = decide_on(&states);
        // A refusal for funds on a cached state may be the cache's: credits it
        // has not seen (it misses nothing else). Decide again on a fresh fold
        // plus this group's own events.
        let short = matches!(outcome, Err(DomainError::InsufficientFunds { .. }));
        if short && from_cache.contains(&payer) && reloaded.insert(payer) {
            let mut fresh = fold_again(conn, &[payer], &[]).await?;
            if let Some(known) = fresh.get_mut(&payer) {
                let own = account_stream(payer);
                for (_, append) in &appends {
                    // Another stream's opening (a fee account's) is not this account's.
                    let events = append
                        .events
                        .iter()
                        .filter(|e| append.stream_id == own || !matches!(e, Event::AccountOpened(_)));
                    known.state = events.fold(std::mem::take(&mut known.state), account::evolve);
                    if append.stream_id == own {
                        known.version += append.events.len() as i64;
                    }
                }
            }
            states.extend(fresh);
            outcome = decide_on(&states);
        }
        match outcome {
            Ok(Decision { appends: own, body, status, effect: None, items })
                if items.is_empty() && own.iter().any(|a| !a.events.is_empty()) =>
            {
                // Every append is to the payer's stream, at the version loaded above.
                for append in own {
                    if append.stream_id != account_stream(payer) {
                        return Err(StoreError::Invariant("a grouped command appended to another stream").into());
                    }
                    let accounts: &[Uuid] = if payer == payee { &[payer] } else { &[payer, payee] };
                    for id in accounts {
                        if let Some(known) = states.get_mut(id) {
                            known.state = append.events.iter().fold(std::mem::take(&mut known.state), account::evolve);
                        }
                    }
                    if let Some(from) = states.get_mut(&payer) {
                        from.version += append.events.len() as i64;
                    }
                    appends.push((i, append));
                }
                decided[i] = Some(Decided::Accepted {
                    command_id: command_id(&p.envelope),
                    status,
                    body,
                    first_event: 0,
                    events: 0,
                });
            }
            Ok(_) => return Err(StoreError::Invariant("a grouped command has no events, or an effect or items").into()),
            Err(rejection) => {
                let (status, body) = (p.render)(&rejection);
                decided[i] = Some(Decided::Rejected { command_id: command_id(&p.envelope), status, body });
            }
        }
    }

    // 5. One append for every event of the group, one insert for every record.
    let recorded_at = Utc::now();
    let mut batch: Vec<(StreamAppend, EventMetadata)> = Vec::with_capacity(appends.len());
    let mut event_index = 0;
    for (i, append) in appends {
        let p = &group[i];
        if let Some(Decided::Accepted { first_event, events, .. }) = decided[i].as_mut() {
            if *events == 0 {
                *first_event = event_index;
            }
            *events += append.events.len();
        }
        event_index += append.events.len();
        let command_id = match &decided[i] {
            Some(Decided::Accepted { command_id, .. }) => *command_id,
            _ => command_id(&p.envelope),
        };
        batch.push((
            append,
            EventMetadata {
                command_id: Some(command_id),
                correlation_id: Some(p.envelope.correlation_id.unwrap_or(command_id)),
                causation_id: p.envelope.causation_id,
                actor_id: Some(p.envelope.actor),
                recorded_at,
                client_ip: p.envelope.client.ip.clone(),
                user_agent: p.envelope.client.user_agent.clone(),
            },
        ));
    }
    // 6. One statement appends every event and records every outcome; an
    // accepted command's record gets its last event's position as written.
    let rows = EventRows::new(&batch, &ledger.event_mac);
    let mut records: Vec<(CommandRow<'_>, Option<Uuid>)> = Vec::new();
    for (p, d) in group.iter().zip(decided.iter()) {
        let (command_id, status, body, last_event) = match d {
            Some(Decided::Rejected { command_id, status, body }) => (*command_id, *status, body, None),
            Some(Decided::Accepted { command_id, status, body, first_event, events }) => {
                (*command_id, *status, body, rows.ids.get(first_event + events.saturating_sub(1)).copied())
            }
            _ => continue,
        };
        let row = CommandRow {
            user_id: p.envelope.actor,
            key: &p.envelope.idempotency_key,
            command_id,
            request_hash: &p.envelope.request_hash,
            status,
            response: body,
            position: None,
        };
        records.push((row, last_event));
    }
    phases.mark();
    let positions = rows.positions(append_and_record(conn, &rows, &records).await?);
    drop(records);
    phases.mark();
    let mut outcomes = Vec::with_capacity(group.len());
    for d in decided {
        let outcome = match d {
            Some(Decided::Alone) => {
                outcomes.push(None);
                continue;
            }
            Some(Decided::Answered(answer)) => answer,
            Some(Decided::Rejected { status, body, .. }) => {
                Ok(Outcome { status, body, replayed: false, position: None })
            }
            Some(Decided::Accepted { status, mut body, first_event, events, .. }) => {
                // The command's position is its last event's.
                let position = positions.get(first_event + events.saturating_sub(1)).copied();
                body["position"] = json!(position);
                Ok(Outcome { status, body, replayed: false, position })
            }
            None => Err(CommandError::Store(StoreError::Conflict)),
        };
        outcomes.push(Some(outcome));
    }
    tx.commit().await?;
    phases.mark();
    tracing::trace!(size = group.len(), micros = ?phases.micros, "group phases: locks, read, decide, append, commit");
    if !batch.is_empty() {
        ledger.committed(positions.iter().copied().max());
    }
    cache.put(states.into_iter().filter(|(id, _)| debited.contains(id) || credited.contains(id)).collect());
    Ok(outcomes)
}

/// Microseconds each phase of a group took, for a trace line.
struct Phases {
    at: Instant,
    micros: Vec<u64>,
}

impl Phases {
    fn start() -> Phases {
        Phases { at: Instant::now(), micros: Vec::with_capacity(5) }
    }

    fn mark(&mut self) {
        let now = Instant::now();
        self.micros.push(now.duration_since(self.at).as_micros() as u64);
        self.at = now;
    }
}

fn decide(states: &HashMap<Uuid, Known>, movement: MoveMoney) -> Result<Vec<Event>, DomainError> {
    let empty = AccountState::default();
    let from = states.get(&movement.from_account).map(|k| &k.state).unwrap_or(&empty);
    let to = states.get(&movement.to_account).map(|k| &k.state).unwrap_or(&empty);
    account::decide_transfer(from, to, movement)
}

fn command_id(envelope: &CommandEnvelope) -> Uuid {
    crate::ledger::command_id_for(envelope)
}

fn replay(previous: &CommandRecord, envelope: &CommandEnvelope) -> Result<Outcome, CommandError> {
    if previous.request_hash != envelope.request_hash {
        return Err(CommandError::IdempotencyKeyReuse);
    }
    Ok(Outcome {
        status: previous.status as u16,
        body: previous.response.clone(),
        replayed: true,
        position: previous.position,
    })
}

fn movement_body(transfer_id: Uuid, events: &[Event]) -> Value {
    crate::ledger::movement_body(transfer_id, events)
}

/// How a lock statement takes the idempotency keys.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyLocks {
    /// Waits for each (one command: an atomic batch).
    Wait,
    /// Takes each that is free and reports the others (a group, which must
    /// not wait on one command's key with every other command in it).
    Try,
}

/// Takes a group's (or an atomic batch's, or a hold command's) locks in one statement: the
/// idempotency keys, then the debited accounts (exclusive), then the credited
/// ones (shared), each class sorted: the order the single-command path keeps
/// too (key, then accounts), so no two paths wait on each other in a cycle
/// (a key only tried never waits). Returns the key lock ids another
/// transaction holds (never any with `KeyLocks::Wait`).
pub(crate) async fn lock_group(
    conn: &mut PgConnection,
    pairs: impl Iterator<Item = (Uuid, &str)>,
    debited: &BTreeSet<Uuid>,
    credited: &BTreeSet<Uuid>,
    keys: KeyLocks,
) -> Result<Locked, sqlx::Error> {
    let mut key_locks: Vec<i64> = pairs.map(|(user, key)| idempotency::key_lock_id(user, key)).collect();
    key_locks.sort_unstable();
    key_locks.dedup();
    let account_keys = |accounts: &BTreeSet<Uuid>| -> Vec<i64> {
        let mut keys: Vec<i64> = accounts.iter().map(|a| i64::from(crate::ledger::lock_key(*a))).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    // The sorted subquery feeds the aggregates in order: locks are taken in
    // it (for each row, every aggregate's argument and filter in turn; CASE,
    // not AND, so a class's lock function runs on that class's rows only).
    // For the rest of the transaction, statements run on generic plans: the
    // read after the locks is six index lookups by id arrays whose best plan
    // does not depend on the values, but its custom plan costs ~1.7 ms of
    // planning per run, more than running it, and PostgreSQL keeps choosing
    // custom plans for it because it misjudges the generic plan's row counts.
    let sql = match keys {
        KeyLocks::Wait => {
            "SELECT set_config('plan_cache_mode', 'force_generic_plan', true),
                    count(CASE sorted.class
                              WHEN 0 THEN pg_advisory_xact_lock(sorted.k)
                              WHEN 1 THEN pg_advisory_xact_lock($4, sorted.k::int)
                              ELSE pg_advisory_xact_lock_shared($5, sorted.k::int) END),
                    NULL::bigint[]
             FROM (SELECT 0 AS class, k FROM unnest($1::bigint[]) AS k
                   UNION ALL SELECT 1, k FROM unnest($2::bigint[]) AS k
                   UNION ALL SELECT 2, k FROM unnest($3::bigint[]) AS k
                   ORDER BY class, k) sorted"
        }
        KeyLocks::Try => {
            "SELECT set_config('plan_cache_mode', 'force_generic_plan', true),
                    count(CASE sorted.class
                              WHEN 1 THEN pg_advisory_xact_lock($4, sorted.k::int)
                              WHEN 2 THEN pg_advisory_xact_lock_shared($5, sorted.k::int) END),
                    array_agg(sorted.k) FILTER (WHERE CASE WHEN sorted.class = 0
                                                       THEN NOT pg_try_advisory_xact_lock(sorted.k) END)
             FROM (SELECT 0 AS class, k FROM unnest($1::bigint[]) AS k
                   UNION ALL SELECT 1, k FROM unnest($2::bigint[]) AS k
                   UNION ALL SELECT 2, k FROM unnest($3::bigint[]) AS k
                   ORDER BY class, k) sorted"
        }
    };
    let (_, _, busy): (String, i64, Option<Vec<i64>>) = sqlx::query_as(sql)
        .bind(&key_locks)
        .bind(account_keys(debited))
        .bind(account_keys(credited))
        .bind(crate::ledger::ACCOUNT_LOCK_CLASS)
        .bind(crate::ledger::ACCOUNT_STATUS_LOCK_CLASS)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Locked { busy: busy.unwrap_or_default() })
}

/// What [`lock_group`] answers once its locks are held.
pub(crate) struct Locked {
    /// Key lock ids another transaction holds (only tried keys).
    pub busy: Vec<i64>,
}

/// What a group reads once its locks are held.
pub(crate) struct ReadAfterLocks<'a> {
    /// (user, key) pairs whose recorded outcomes to find.
    pub users: &'a [Uuid],
    pub keys: &'a [&'a str],
    /// Accounts whose streams' versions to read.
    pub accounts: &'a [Uuid],
    /// Cached states (account, version they are at): their streams' later events.
    pub cached: &'a [(Uuid, i64)],
    /// Accounts to fold in full (every movement), and credit-side only.
    pub full: &'a [Uuid],
    pub opening: &'a [Uuid],
    /// (user, session) pairs to check as `check_session` does.
    pub sessions: &'a [(Uuid, Uuid)],
}

/// What it found, all of one snapshot.
pub(crate) struct FoundAfterLocks {
    pub records: HashMap<(Uuid, String), CommandRecord>,
    pub versions: HashMap<Uuid, i64>,
    /// Cached accounts' later events: (account, the stream version it brings them to, event), in order.
    pub later: Vec<(Uuid, i64, Event)>,
    pub full: HashMap<Uuid, Known>,
    pub opening: HashMap<Uuid, Known>,
    /// One answer per pair of `sessions`, in order.
    pub sessions: Vec<CredentialCheck>,
    /// The database's clock once the locks were held (`statement_timestamp()`):
    /// holds' expiries are decided by it, on every instance alike, and not by
    /// the transaction's start, which a wait for the locks may leave behind.
    pub now: DateTime<Utc>,
}

/// Reads everything a group decides on in one statement (one round trip
/// instead of three to five): each part is the query that would otherwise be
/// its own statement, tagged by `part`. It must follow the locks in a
/// statement of its own, whose snapshot sees what earlier holders committed.
pub(crate) async fn read_after_locks(
    conn: &mut PgConnection,
    read: &ReadAfterLocks<'_>,
) -> Result<FoundAfterLocks, StoreError> {
    // A fold starts at its stream's version, read here: folded accounts must be among those versioned.
    debug_assert!(
        read.full.iter().chain(read.opening).all(|a| read.accounts.contains(a)),
        "every folded account's version is read"
    );
    let streams = |ids: &[Uuid]| -> Vec<String> { ids.iter().map(|a| account_stream(*a)).collect() };
    let cached_streams: Vec<String> = read.cached.iter().map(|(id, _)| account_stream(*id)).collect();
    let cached_after: Vec<i64> = read.cached.iter().map(|(_, v)| *v).collect();
    let full_ids: Vec<String> = read.full.iter().map(Uuid::to_string).collect();
    let rows = sqlx::query(
        "SELECT 0 AS part, NULL::text AS stream_id, NULL::bigint AS stream_version, NULL::text AS event_type,
                NULL::int AS schema_version, NULL::jsonb AS payload, NULL::bigint AS event_position,
                c.user_id, c.idempotency_key, c.command_id, c.request_hash, c.status, c.response, c.position,
                c.recorded_at, NULL::text AS role, NULL::bool AS blocked, NULL::bool AS active
         FROM commands c JOIN unnest($1::uuid[], $2::text[]) AS k(user_id, idempotency_key)
           ON c.user_id = k.user_id AND c.idempotency_key = k.idempotency_key
         UNION ALL
         SELECT 1, s.stream_id, (SELECT max(stream_version) FROM events e WHERE e.stream_id = s.stream_id),
                NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM unnest($3::text[]) AS s(stream_id)
         UNION ALL
         SELECT 2, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.payload, e.position,
                NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM unnest($4::text[], $5::bigint[]) AS s(stream_id, after)
         JOIN events e ON e.stream_id = s.stream_id AND e.stream_version > s.after
         UNION ALL
         SELECT 3, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.payload, e.position,
                NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM events e
         WHERE e.stream_id = ANY($6)
            OR (e.event_type = 'TransferRecorded' AND e.payload->>'to_account' = ANY($7))
            OR (e.event_type = 'TransferRecorded' AND e.payload->>'from_account' = ANY($7))
         UNION ALL
         SELECT 4, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.payload, e.position,
                NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM events e
         WHERE e.stream_id = ANY($8) AND e.event_type IN ('AccountOpened', 'AccountFrozen', 'AccountUnfrozen')
         UNION ALL
         SELECT 5, NULL, NULL, NULL, NULL, NULL, q.i, q.user_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c.role,
                c.blocked,
                s.session_id IS NOT NULL AND s.revoked_at IS NULL AND s.expires_at > statement_timestamp()
         FROM unnest($9::uuid[], $10::uuid[]) WITH ORDINALITY AS q(user_id, session_id, i)
         JOIN credentials c ON c.user_id = q.user_id
         LEFT JOIN sessions s ON s.session_id = q.session_id AND s.user_id = c.user_id
         UNION ALL
         SELECT 6, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                statement_timestamp(), NULL, NULL, NULL
         ORDER BY part, event_position",
    )
    .bind(read.users)
    .bind(read.keys)
    .bind(streams(read.accounts))
    .bind(&cached_streams)
    .bind(&cached_after)
    .bind(streams(read.full))
    .bind(&full_ids)
    .bind(streams(read.opening))
    .bind(read.sessions.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(read.sessions.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;

    let mut records = HashMap::new();
    let mut versions: HashMap<Uuid, i64> = read.accounts.iter().map(|a| (*a, 0)).collect();
    let mut later = Vec::new();
    let mut full_rows = Vec::new();
    let mut opening_rows = Vec::new();
    // A pair without a row names no user: its session has ended.
    let mut sessions: Vec<CredentialCheck> = read.sessions.iter().map(|_| CredentialCheck::Ended).collect();
    let mut now = None;
    // Rows are keyed by the stream they name: never by the order they come back in.
    let by_stream: HashMap<String, Uuid> =
        read.accounts.iter().chain(read.cached.iter().map(|(id, _)| id)).map(|a| (account_stream(*a), *a)).collect();
    for row in rows {
        match row.try_get::<i32, _>("part")? {
            0 => {
                let user: Uuid = row.try_get("user_id")?;
                let record = CommandRecord::from_row(&row)?;
                records.insert((user, record.idempotency_key.clone()), record);
            }
            1 => {
                if let Some(account) = by_stream.get(row.try_get::<&str, _>("stream_id")?) {
                    versions.insert(*account, row.try_get::<Option<i64>, _>("stream_version")?.unwrap_or(0));
                }
            }
            2 => {
                if let Some(account) = by_stream.get(row.try_get::<&str, _>("stream_id")?) {
                    later.push((*account, row.try_get("stream_version")?, stored_event(&row)?));
                }
            }
            3 => full_rows.push(row),
            4 => opening_rows.push(row),
            6 => now = Some(row.try_get::<DateTime<Utc>, _>("recorded_at")?),
            _ => {
                let i: i64 = row.try_get("event_position")?;
                let index = usize::try_from(i - 1).ok().filter(|&index| index < sessions.len()).ok_or_else(|| {
                    sqlx::Error::Protocol(format!("session check answered pair {i} of {}", sessions.len()))
                })?;
                sessions[index] = credential_check(read.sessions[index].0, &row)?;
            }
        }
    }
    let full = fold_full(read.full, &versions, &full_rows)?;
    let opening = fold_opening(read.opening, &versions, &opening_rows)?;
    let now = now.ok_or_else(|| sqlx::Error::Protocol("the read after the locks answered no clock".into()))?;
    Ok(FoundAfterLocks { records, versions, later, full, opening, sessions, now })
}

/// Folds accounts from the log again (full states for `full`, credit-side
/// ones for `opening`), at their streams' current versions: the same read as
/// after the locks, without the rest.
async fn fold_again(
    conn: &mut PgConnection,
    full: &[Uuid],
    opening: &[Uuid],
) -> Result<HashMap<Uuid, Known>, StoreError> {
    if full.is_empty() && opening.is_empty() {
        return Ok(HashMap::new());
    }
    let accounts: Vec<Uuid> = full.iter().chain(opening).copied().collect();
    let found = read_after_locks(
        conn,
        &ReadAfterLocks { users: &[], keys: &[], accounts: &accounts, cached: &[], full, opening, sessions: &[] },
    )
    .await?;
    Ok(found.full.into_iter().chain(found.opening).collect())
}

/// States at their streams' versions, before any event is applied.
fn unfolded(accounts: &[Uuid], versions: &HashMap<Uuid, i64>, full: bool) -> HashMap<Uuid, Known> {
    accounts
        .iter()
        .map(|a| (*a, Known { state: AccountState::default(), version: versions.get(a).copied().unwrap_or(0), full }))
        .collect()
}

/// Full states of the accounts from rows (`event_type`, `schema_version`,
/// `payload`, `stream_id`) of their streams and of every movement naming
/// them, in log order.
fn fold_full(
    accounts: &[Uuid],
    versions: &HashMap<Uuid, i64>,
    rows: &[sqlx::postgres::PgRow],
) -> Result<HashMap<Uuid, Known>, StoreError> {
    let by_stream: HashMap<String, Uuid> = accounts.iter().map(|a| (account_stream(*a), *a)).collect();
    let mut states = unfolded(accounts, versions, true);
    for row in rows {
        let event = stored_event(row)?;
        // The accounts this event is about: its stream's, and a movement's two sides.
        let mut about: Vec<Uuid> = Vec::with_capacity(2);
        if let Some(a) = by_stream.get(row.try_get::<&str, _>("stream_id")?) {
            about.push(*a);
        }
        if let Event::TransferRecorded(t) = &event {
            for side in [t.from_account, t.to_account] {
                if states.contains_key(&side) && !about.contains(&side) {
                    about.push(side);
                }
            }
        }
        for a in about {
            if let Some(known) = states.get_mut(&a) {
                known.state = account::evolve(std::mem::take(&mut known.state), &event);
            }
        }
    }
    Ok(states)
}

/// Credit-side states of the accounts from rows (`event_type`,
/// `schema_version`, `payload`, `stream_id`) of their openings and freezes.
fn fold_opening(
    accounts: &[Uuid],
    versions: &HashMap<Uuid, i64>,
    rows: &[sqlx::postgres::PgRow],
) -> Result<HashMap<Uuid, Known>, StoreError> {
    let by_stream: HashMap<String, Uuid> = accounts.iter().map(|a| (account_stream(*a), *a)).collect();
    let mut states = unfolded(accounts, versions, false);
    for row in rows {
        let Some(a) = by_stream.get(row.try_get::<&str, _>("stream_id")?) else { continue };
        let event = stored_event(row)?;
        if let Some(known) = states.get_mut(a) {
            known.state = account::evolve(std::mem::take(&mut known.state), &event);
        }
    }
    Ok(states)
}

/// An idempotency record to write.
pub(crate) struct CommandRow<'a> {
    pub user_id: Uuid,
    pub key: &'a str,
    pub command_id: Uuid,
    pub request_hash: &'a [u8],
    pub status: u16,
    pub response: &'a Value,
    pub position: Option<i64>,
}

/// Appends events and records outcomes in one statement. Each record's
/// `Option<Uuid>` names the event whose position it takes (an accepted
/// command's last), set in its `position` column and response body as
/// written; records without one keep theirs. Returns what the insert of the
/// events returned.
async fn append_and_record(
    conn: &mut PgConnection,
    events: &EventRows,
    records: &[(CommandRow<'_>, Option<Uuid>)],
) -> Result<Vec<(Uuid, i64)>, StoreError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH appended AS ({} RETURNING event_id, position),
                  recorded AS (
                      INSERT INTO commands (user_id, idempotency_key, command_id, request_hash, status, response,
                                            position)
                      SELECT r.user_id, r.idempotency_key, r.command_id, r.request_hash, r.status,
                             CASE WHEN a.position IS NULL THEN r.response
                                  ELSE jsonb_set(r.response, '{{position}}', to_jsonb(a.position)) END,
                             coalesce(a.position, r.position)
                      FROM unnest($15::uuid[], $16::text[], $17::uuid[], $18::bytea[], $19::smallint[],
                                  $20::jsonb[], $21::bigint[], $22::uuid[])
                           AS r(user_id, idempotency_key, command_id, request_hash, status, response, position,
                                last_event)
                      LEFT JOIN appended a ON a.event_id = r.last_event)
             SELECT event_id, position FROM appended",
            store::INSERT_EVENTS
        )
    });
    if events.is_empty() && records.is_empty() {
        return Ok(vec![]);
    }
    let result = events
        .bind(sqlx::query_as::<_, (Uuid, i64)>(SQL.as_str()))
        .bind(records.iter().map(|(r, _)| r.user_id).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.key).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.command_id).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.request_hash).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.status as i16).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.response).collect::<Vec<_>>())
        .bind(records.iter().map(|(r, _)| r.position).collect::<Vec<_>>())
        .bind(records.iter().map(|(_, last)| *last).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await;
    match result {
        Ok(written) => Ok(written),
        Err(e) if store::is_unique_violation(&e) => Err(StoreError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Writes idempotency records in one statement.
pub(crate) async fn record_many(conn: &mut PgConnection, rows: &[CommandRow<'_>]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO commands (user_id, idempotency_key, command_id, request_hash, status, response, position)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::bytea[], $5::smallint[], $6::jsonb[], $7::bigint[])",
    )
    .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.key).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.command_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.request_hash).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status as i16).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.response).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
