//! Group commit for transfers: concurrent `POST /v1/transfers` commands are
//! decided together and written in one PostgreSQL transaction, with a handful
//! of set-based statements per group instead of a dozen round trips and a
//! commit per transfer.
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
//! The write side also keeps the state of recently debited accounts. It is a
//! lower bound, never an over-estimate: everything that lowers an account's
//! available funds (debits, holds, freezes) is appended to the account's own
//! stream under its lock, so a cached state at the stream's current version
//! has missed at most credits. A debit allowed by a lower bound is allowed by
//! the truth; a debit it refuses is decided again on a fresh fold.

use crate::idempotency::{self, CommandRecord};
use crate::ledger::{CommandEnvelope, CommandError, Ledger, LedgerCommand, Outcome, RenderRejection};
use crate::store::{self, account_stream, EventMetadata, StoreError, StreamAppend};
use chrono::Utc;
use ledger_domain::account::{self, AccountState, MoveMoney};
use ledger_domain::events::TransferKind;
use ledger_domain::money::Amount;
use ledger_domain::{DomainError, Event};
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most commands decided in one transaction.
const MAX_GROUP: usize = 256;
/// Cached account states kept at most; the cache is cleared beyond it.
const MAX_CACHED_ACCOUNTS: usize = 200_000;

/// A transfer waiting for its group.
pub(crate) struct Pending {
    envelope: CommandEnvelope,
    transfer: Transfer,
    render: RenderRejection,
    reply: oneshot::Sender<Result<Outcome, CommandError>>,
}

#[derive(Clone, Debug)]
struct Transfer {
    from_account: Uuid,
    to_account: Uuid,
    amount: String,
    reference: Option<String>,
}

impl Transfer {
    fn command(&self) -> LedgerCommand {
        LedgerCommand::Transfer {
            from_account: self.from_account,
            to_account: self.to_account,
            amount: self.amount.clone(),
            reference: self.reference.clone(),
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

impl GroupCommit {
    /// Starts `writers` tasks. Each takes what is queued (up to a group),
    /// writes it, and comes back: a busy server forms large groups, an idle
    /// one commits each transfer at once.
    pub(crate) fn start(ledger: Ledger, writers: usize) -> GroupCommit {
        let (queue, receiver) = mpsc::channel::<Pending>(MAX_GROUP * writers.max(1) * 4);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let cache = AccountCache::default();
        for _ in 0..writers.max(1) {
            let receiver = receiver.clone();
            let ledger = ledger.clone();
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut deferred: Vec<Pending> = Vec::new();
                loop {
                    let Some(group) = next_group(&receiver, &mut deferred).await else { break };
                    write_group(&ledger, &cache, group).await;
                }
            });
        }
        GroupCommit { queue }
    }

    /// Queues a transfer and waits for its outcome. `None` when the command
    /// is not a transfer (the caller runs it directly).
    pub(crate) async fn submit(
        &self,
        envelope: &CommandEnvelope,
        command: &LedgerCommand,
        render: RenderRejection,
    ) -> Option<Result<Outcome, CommandError>> {
        let LedgerCommand::Transfer { from_account, to_account, amount, reference } = command else { return None };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            envelope: envelope.clone(),
            transfer: Transfer {
                from_account: *from_account,
                to_account: *to_account,
                amount: amount.clone(),
                reference: reference.clone(),
            },
            render,
            reply,
        };
        if self.queue.send(pending).await.is_err() {
            return None;
        }
        answer.await.ok()
    }
}

/// Takes the deferred commands and whatever else is queued, one per (user,
/// key); waits only when there is nothing at all.
async fn next_group(
    receiver: &tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    deferred: &mut Vec<Pending>,
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
    let mut receiver = if group.is_empty() {
        let mut receiver = receiver.lock().await;
        let first = receiver.recv().await?;
        keys.insert((first.envelope.actor, first.envelope.idempotency_key.clone()));
        group.push(first);
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

/// Writes a group; on any failure of the transaction, runs each of its
/// commands alone.
async fn write_group(ledger: &Ledger, cache: &AccountCache, group: Vec<Pending>) {
    let accounts: Vec<Uuid> = group.iter().flat_map(|p| [p.transfer.from_account, p.transfer.to_account]).collect();
    match try_group(ledger, cache, &group).await {
        Ok(outcomes) => {
            tracing::trace!(size = outcomes.len(), "group committed");
            for (pending, outcome) in group.into_iter().zip(outcomes) {
                let _ = pending.reply.send(outcome);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, size = group.len(), "group commit failed; running its commands one by one");
            cache.forget(accounts.into_iter());
            for pending in group {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let outcome =
                        ledger.execute_direct(&pending.envelope, pending.transfer.command(), pending.render).await;
                    let _ = pending.reply.send(outcome);
                });
            }
        }
    }
}

/// What became of one command of the group before the append.
enum Decided {
    Answered(Result<Outcome, CommandError>),
    Rejected { command_id: Uuid, status: u16, body: Value },
    Accepted { command_id: Uuid, body: Value, first_event: usize, events: usize },
}

async fn try_group(
    ledger: &Ledger,
    cache: &AccountCache,
    group: &[Pending],
) -> Result<Vec<Result<Outcome, CommandError>>, StoreError> {
    let mut tx = ledger.pool.begin().await?;
    let conn: &mut PgConnection = &mut tx;

    // 1. Every lock in one statement, in the one order every path takes them:
    // the keys, then debited accounts exclusively, then credited ones shared
    // (a freeze waits for them), each class sorted. The accounts of a command
    // that turns out to be a replay are locked too: harmless, and it saves
    // the group two round trips (a lookup must follow the locks in a
    // statement of its own, whose snapshot sees what the previous holders
    // committed).
    let debited: BTreeSet<Uuid> = group.iter().map(|p| p.transfer.from_account).collect();
    let credited: BTreeSet<Uuid> =
        group.iter().map(|p| p.transfer.to_account).filter(|a| !debited.contains(a)).collect();
    lock_group(
        conn,
        group.iter().map(|p| (p.envelope.actor, p.envelope.idempotency_key.as_str())),
        &debited,
        &credited,
    )
    .await?;
    let previous = find_records(conn, group).await?;

    // 2. What is left to decide: not a replay, and an amount that parses.
    let mut decided: Vec<Option<Decided>> = Vec::with_capacity(group.len());
    let mut todo: Vec<(usize, Amount)> = Vec::new();
    for (i, p) in group.iter().enumerate() {
        let key = (p.envelope.actor, p.envelope.idempotency_key.as_str());
        if let Some(record) = previous.get(&(key.0, key.1.to_owned())) {
            decided.push(Some(Decided::Answered(replay(record, &p.envelope))));
            continue;
        }
        match Amount::parse("amount", &p.transfer.amount) {
            Ok(amount) => {
                todo.push((i, amount));
                decided.push(None);
            }
            Err(rejection) => {
                let (status, body) = (p.render)(&rejection);
                decided.push(Some(Decided::Rejected { command_id: command_id(&p.envelope), status, body }));
            }
        }
    }

    // 3. Their states: from the cache where the stream has not moved since,
    // else folded from the log.
    let all: Vec<Uuid> = debited.iter().chain(credited.iter()).copied().collect();
    let versions = stream_versions(conn, &all).await?;
    let mut states: HashMap<Uuid, Known> = cache.get(all.iter().copied());
    // Usable: at the stream's version, or behind it (the stream's later
    // events, all of them, bring it forward). Never ahead of it.
    states.retain(|id, known| {
        versions.get(id).copied().unwrap_or(0) >= known.version && (known.full || !debited.contains(id))
    });
    catch_up(conn, &mut states, &versions).await?;
    let from_cache: HashSet<Uuid> = states.keys().copied().collect();
    let missing_full: Vec<Uuid> = debited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    let missing_opening: Vec<Uuid> = credited.iter().filter(|a| !states.contains_key(a)).copied().collect();
    states.extend(load_full(conn, &missing_full, &versions).await?);
    states.extend(load_opening(conn, &missing_opening, &versions).await?);

    // 4. Decide in order; each command sees what the earlier ones did.
    let fee = ledger.fees.rule(TransferKind::Transfer);
    let mut appends: Vec<(usize, StreamAppend)> = Vec::new();
    let mut fee_accounts_checked = BTreeSet::new();
    let mut reloaded: HashSet<Uuid> = HashSet::new();
    for (i, amount) in todo {
        let p = &group[i];
        let t = &p.transfer;
        if let (Some(_), Some(currency)) = (fee, states.get(&t.from_account).and_then(|k| k.state.currency())) {
            if fee_accounts_checked.insert(currency.code()) {
                for open in crate::ledger::open_fee_account_if_missing(conn, currency).await? {
                    appends.push((i, open));
                }
            }
        }
        let transfer_id = Uuid::now_v7();
        let movement = MoveMoney {
            transfer_id,
            kind: TransferKind::Transfer,
            initiated_by: p.envelope.actor,
            from_account: t.from_account,
            to_account: t.to_account,
            amount,
            reference: t.reference.clone(),
            fee,
        };
        let mut outcome = decide(&states, movement.clone());
        // A refusal on a cached state may be the cache's: credits it has not
        // seen. Decide again on a fresh fold plus this group's own events.
        if outcome.is_err() && from_cache.contains(&t.from_account) && reloaded.insert(t.from_account) {
            let mut fresh = load_full(conn, &[t.from_account], &versions).await?;
            if let Some(known) = fresh.get_mut(&t.from_account) {
                for (_, append) in &appends {
                    known.state = append.events.iter().fold(std::mem::take(&mut known.state), account::evolve);
                    if append.stream_id == account_stream(t.from_account) {
                        known.version += append.events.len() as i64;
                    }
                }
            }
            states.extend(fresh);
            outcome = decide(&states, movement);
        }
        match outcome {
            Ok(events) => {
                // Every debited account was loaded above; the expected version is its.
                let Some(expected_version) = states.get(&t.from_account).map(|k| k.version) else { continue };
                for id in [t.from_account, t.to_account] {
                    if let Some(known) = states.get_mut(&id) {
                        known.state = events.iter().fold(std::mem::take(&mut known.state), account::evolve);
                    }
                }
                if let Some(from) = states.get_mut(&t.from_account) {
                    from.version += events.len() as i64;
                }
                let body = movement_body(transfer_id, &events);
                decided[i] =
                    Some(Decided::Accepted { command_id: command_id(&p.envelope), body, first_event: 0, events: 0 });
                appends.push((i, StreamAppend { stream_id: account_stream(t.from_account), expected_version, events }));
            }
            Err(rejection) => {
                let (status, body) = (p.render)(&rejection);
                decided[i] = Some(Decided::Rejected { command_id: command_id(&p.envelope), status, body });
            }
        }
    }

    // 5. One append for every event of the group, one insert for every record.
    let now = Utc::now();
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
                recorded_at: now,
                client_ip: p.envelope.client.ip.clone(),
                user_agent: p.envelope.client.user_agent.clone(),
            },
        ));
    }
    let positions = store::append_many(conn, &batch, &ledger.event_mac).await?;
    let mut records = Vec::new();
    let mut outcomes = Vec::with_capacity(group.len());
    for (p, d) in group.iter().zip(decided) {
        let outcome = match d {
            Some(Decided::Answered(answer)) => answer,
            Some(Decided::Rejected { command_id, status, body }) => {
                records.push((p, command_id, status, body.clone(), None));
                Ok(Outcome { status, body, replayed: false, position: None })
            }
            Some(Decided::Accepted { command_id, mut body, first_event, events }) => {
                // The command's position is its last event's.
                let position = positions.get(first_event + events.saturating_sub(1)).copied();
                body["position"] = json!(position);
                records.push((p, command_id, 201, body.clone(), position));
                Ok(Outcome { status: 201, body, replayed: false, position })
            }
            None => Err(CommandError::Store(StoreError::Conflict)),
        };
        outcomes.push(outcome);
    }
    record_all(conn, &records).await?;
    tx.commit().await?;
    if !batch.is_empty() {
        ledger.appended.notify_one();
    }
    cache.put(states.into_iter().filter(|(id, _)| debited.contains(id) || credited.contains(id)).collect());
    Ok(outcomes)
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

async fn find_records(
    conn: &mut PgConnection,
    group: &[Pending],
) -> Result<HashMap<(Uuid, String), CommandRecord>, sqlx::Error> {
    let users: Vec<Uuid> = group.iter().map(|p| p.envelope.actor).collect();
    let keys: Vec<&str> = group.iter().map(|p| p.envelope.idempotency_key.as_str()).collect();
    find_many(conn, &users, &keys).await
}

/// The recorded outcomes of several (user, key) pairs, in one statement.
pub(crate) async fn find_many(
    conn: &mut PgConnection,
    users: &[Uuid],
    keys: &[&str],
) -> Result<HashMap<(Uuid, String), CommandRecord>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Found {
        user_id: Uuid,
        #[sqlx(flatten)]
        record: CommandRecord,
    }
    let found: Vec<Found> = sqlx::query_as(
        "SELECT c.user_id, c.idempotency_key, c.command_id, c.request_hash, c.status, c.response, c.position,
                c.recorded_at
         FROM commands c JOIN unnest($1::uuid[], $2::text[]) AS k(user_id, idempotency_key)
           ON c.user_id = k.user_id AND c.idempotency_key = k.idempotency_key",
    )
    .bind(users)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(found.into_iter().map(|f| ((f.user_id, f.record.idempotency_key.clone()), f.record)).collect())
}

/// Locks (user, key) pairs in one statement, in one order everywhere.
pub(crate) async fn lock_keys(
    conn: &mut PgConnection,
    pairs: impl Iterator<Item = (Uuid, &str)>,
) -> Result<(), sqlx::Error> {
    let mut key_locks: Vec<i64> = pairs.map(|(user, key)| idempotency::key_lock_id(user, key)).collect();
    key_locks.sort_unstable();
    key_locks.dedup();
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) sorted",
    )
    .bind(&key_locks)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(crate) async fn lock_accounts(
    conn: &mut PgConnection,
    function: &str,
    class: i32,
    accounts: &BTreeSet<Uuid>,
) -> Result<(), sqlx::Error> {
    if accounts.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<i32> = accounts.iter().map(|a| crate::ledger::lock_key(*a)).collect();
    keys.sort_unstable();
    keys.dedup();
    // The sorted subquery feeds the aggregate in order: locks are taken in it.
    let sql = format!("SELECT count({function}($1, k)) FROM (SELECT k FROM unnest($2::int[]) AS k ORDER BY k) sorted");
    sqlx::query(&sql).bind(class).bind(&keys).execute(&mut *conn).await?;
    Ok(())
}

/// Takes a group's locks in one statement: the idempotency keys, then the
/// debited accounts (exclusive), then the credited ones (shared), each class
/// sorted: the order of `lock_keys` followed by `lock_accounts` twice, which
/// every other path keeps, so no two paths wait on each other in a cycle.
pub(crate) async fn lock_group(
    conn: &mut PgConnection,
    pairs: impl Iterator<Item = (Uuid, &str)>,
    debited: &BTreeSet<Uuid>,
    credited: &BTreeSet<Uuid>,
) -> Result<(), sqlx::Error> {
    let mut key_locks: Vec<i64> = pairs.map(|(user, key)| idempotency::key_lock_id(user, key)).collect();
    key_locks.sort_unstable();
    key_locks.dedup();
    let account_keys = |accounts: &BTreeSet<Uuid>| -> Vec<i64> {
        let mut keys: Vec<i64> = accounts.iter().map(|a| i64::from(crate::ledger::lock_key(*a))).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    // The sorted subquery feeds the aggregate in order: locks are taken in it.
    sqlx::query(
        "SELECT count(CASE sorted.class
                          WHEN 0 THEN pg_advisory_xact_lock(sorted.k)
                          WHEN 1 THEN pg_advisory_xact_lock($4, sorted.k::int)
                          ELSE pg_advisory_xact_lock_shared($5, sorted.k::int) END)
         FROM (SELECT 0 AS class, k FROM unnest($1::bigint[]) AS k
               UNION ALL SELECT 1, k FROM unnest($2::bigint[]) AS k
               UNION ALL SELECT 2, k FROM unnest($3::bigint[]) AS k
               ORDER BY class, k) sorted",
    )
    .bind(&key_locks)
    .bind(account_keys(debited))
    .bind(account_keys(credited))
    .bind(crate::ledger::ACCOUNT_LOCK_CLASS)
    .bind(crate::ledger::ACCOUNT_STATUS_LOCK_CLASS)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Brings cached states forward by their streams' later events (debits,
/// holds, freezes by other writers or instances), in one statement. The
/// credits they missed stay missed: the states remain lower bounds.
async fn catch_up(
    conn: &mut PgConnection,
    states: &mut HashMap<Uuid, Known>,
    versions: &HashMap<Uuid, i64>,
) -> Result<(), StoreError> {
    let behind: Vec<(Uuid, i64)> = states
        .iter()
        .filter(|(id, known)| versions.get(id).copied().unwrap_or(0) > known.version)
        .map(|(id, known)| (*id, known.version))
        .collect();
    if behind.is_empty() {
        return Ok(());
    }
    let streams: Vec<String> = behind.iter().map(|(id, _)| account_stream(*id)).collect();
    let after: Vec<i64> = behind.iter().map(|(_, v)| *v).collect();
    let by_stream: HashMap<&str, Uuid> =
        streams.iter().map(String::as_str).zip(behind.iter().map(|(id, _)| *id)).collect();
    let rows = sqlx::query(
        "SELECT e.stream_id, e.stream_version, e.event_type, e.schema_version, e.payload
         FROM unnest($1::text[], $2::bigint[]) AS s(stream_id, after)
         JOIN events e ON e.stream_id = s.stream_id AND e.stream_version > s.after
         ORDER BY e.stream_id, e.stream_version",
    )
    .bind(&streams)
    .bind(&after)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let Some(id) = by_stream.get(row.try_get::<&str, _>("stream_id")?) else { continue };
        let event = stored_event(&row)?;
        if let Some(known) = states.get_mut(id) {
            known.state = account::evolve(std::mem::take(&mut known.state), &event);
            known.version = row.try_get("stream_version")?;
        }
    }
    // A state that did not reach its stream's version (a row it could not
    // see) is not used.
    states.retain(|id, known| versions.get(id).copied().unwrap_or(0) == known.version);
    Ok(())
}

/// The event in a row that has `event_type`, `schema_version` and `payload`.
fn stored_event(row: &sqlx::postgres::PgRow) -> Result<Event, StoreError> {
    Ok(Event::from_stored(
        row.try_get::<&str, _>("event_type")?,
        row.try_get("schema_version")?,
        row.try_get("payload")?,
    )?)
}

/// The current version of each account's stream (absent: 0).
pub(crate) async fn stream_versions(
    conn: &mut PgConnection,
    accounts: &[Uuid],
) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    let streams: Vec<String> = accounts.iter().map(|a| account_stream(*a)).collect();
    let rows = sqlx::query(
        "SELECT s.stream_id, (SELECT max(stream_version) FROM events e WHERE e.stream_id = s.stream_id) AS version
         FROM unnest($1::text[]) AS s(stream_id)",
    )
    .bind(&streams)
    .fetch_all(&mut *conn)
    .await?;
    // Keyed by the stream each row names: never by the order rows come back in.
    let by_stream: HashMap<String, Uuid> = streams.iter().cloned().zip(accounts.iter().copied()).collect();
    let mut versions: HashMap<Uuid, i64> = accounts.iter().map(|a| (*a, 0)).collect();
    for row in rows {
        if let Some(account) = by_stream.get(row.try_get::<&str, _>("stream_id")?) {
            versions.insert(*account, row.try_get::<Option<i64>, _>("version")?.unwrap_or(0));
        }
    }
    Ok(versions)
}

/// Full states (every movement) of the accounts, in one statement.
pub(crate) async fn load_full(
    conn: &mut PgConnection,
    accounts: &[Uuid],
    versions: &HashMap<Uuid, i64>,
) -> Result<HashMap<Uuid, Known>, StoreError> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let streams: Vec<String> = accounts.iter().map(|a| account_stream(*a)).collect();
    let ids: Vec<String> = accounts.iter().map(Uuid::to_string).collect();
    let rows = sqlx::query(
        "SELECT event_type, schema_version, payload, stream_id FROM events
         WHERE stream_id = ANY($1)
            OR (event_type = 'TransferRecorded' AND payload->>'to_account' = ANY($2))
            OR (event_type = 'TransferRecorded' AND payload->>'from_account' = ANY($2))
         ORDER BY position",
    )
    .bind(&streams)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let by_stream: HashMap<String, Uuid> = streams.into_iter().zip(accounts.iter().copied()).collect();
    let mut states: HashMap<Uuid, Known> = accounts
        .iter()
        .map(|a| {
            (*a, Known { state: AccountState::default(), version: versions.get(a).copied().unwrap_or(0), full: true })
        })
        .collect();
    for row in rows {
        let event = stored_event(&row)?;
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

/// Openings and freezes of the accounts (the credit side), in one statement.
pub(crate) async fn load_opening(
    conn: &mut PgConnection,
    accounts: &[Uuid],
    versions: &HashMap<Uuid, i64>,
) -> Result<HashMap<Uuid, Known>, StoreError> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let streams: Vec<String> = accounts.iter().map(|a| account_stream(*a)).collect();
    let rows = sqlx::query(
        "SELECT event_type, schema_version, payload, stream_id FROM events
         WHERE stream_id = ANY($1) AND event_type IN ('AccountOpened', 'AccountFrozen', 'AccountUnfrozen')
         ORDER BY stream_id, stream_version",
    )
    .bind(&streams)
    .fetch_all(&mut *conn)
    .await?;
    let by_stream: HashMap<String, Uuid> = streams.into_iter().zip(accounts.iter().copied()).collect();
    let mut states: HashMap<Uuid, Known> = accounts
        .iter()
        .map(|a| {
            (*a, Known { state: AccountState::default(), version: versions.get(a).copied().unwrap_or(0), full: false })
        })
        .collect();
    for row in rows {
        let Some(a) = by_stream.get(row.try_get::<&str, _>("stream_id")?) else { continue };
        let event = stored_event(&row)?;
        if let Some(known) = states.get_mut(a) {
            known.state = account::evolve(std::mem::take(&mut known.state), &event);
        }
    }
    Ok(states)
}

type Record<'a> = (&'a Pending, Uuid, u16, Value, Option<i64>);

async fn record_all(conn: &mut PgConnection, records: &[Record<'_>]) -> Result<(), sqlx::Error> {
    let rows: Vec<CommandRow<'_>> = records
        .iter()
        .map(|r| CommandRow {
            user_id: r.0.envelope.actor,
            key: &r.0.envelope.idempotency_key,
            command_id: r.1,
            request_hash: &r.0.envelope.request_hash,
            status: r.2,
            response: &r.3,
            position: r.4,
        })
        .collect();
    record_many(conn, &rows).await
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
