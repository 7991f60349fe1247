//! Holds and orders on the write side: load, decide, and the appends, for
//! `Ledger::execute`. Every step that touches an order appends to the order's
//! stream under its version in the same transaction as the hold's events, so
//! a cancellation and a payment racing on one order cannot both win.
//!
//! The nil actor is the system (the payment process and the expiry
//! scheduler); it may capture, release and expire any hold.

use crate::group_commit::{lock_group, read_after_locks, KeyLocks, Known, ReadAfterLocks};
use crate::idempotency::CommandRecord;
use crate::identity::CredentialCheck;
use crate::ledger::{account_state, lock_account, lock_status_shared, CommandEnvelope, Decision, LedgerCommand};
use crate::store::{self, account_stream, StoreError, StreamAppend};
use chrono::Utc;
use ledger_domain::account::{self, AccountState, MoveMoney};
use ledger_domain::events::AccountKind;
use ledger_domain::events::{CancelReason, Event, TransferKind};
use ledger_domain::hold::{self, CaptureHold, PlaceHold};
use ledger_domain::money::Amount;
use ledger_domain::order::{self, OrderState, PlaceOrder};
use ledger_domain::DomainError;
use serde_json::json;
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

type Decided = Result<Result<Decision, DomainError>, StoreError>;

pub fn order_stream(order_id: Uuid) -> String {
    format!("order-{order_id}")
}

async fn order_state(conn: &mut PgConnection, order_id: Uuid) -> Result<(OrderState, i64), StoreError> {
    let (events, version) = store::load_stream(conn, &order_stream(order_id)).await?;
    Ok((events.iter().fold(OrderState::default(), order::evolve), version))
}

fn parse(amount: &str) -> Result<Amount, DomainError> {
    Amount::parse("amount", amount)
}

/// A hold's account, locked for debits, with its state and version.
async fn held_account(conn: &mut PgConnection, hold_id: Uuid) -> Result<Option<(Uuid, AccountState, i64)>, StoreError> {
    let Some((account_id, _)) = hold_parties(conn, hold_id).await? else { return Ok(None) };
    lock_account(conn, account_id).await?;
    let (state, version) = account_state(conn, account_id, true).await?;
    Ok(Some((account_id, state, version)))
}

/// The database's clock: every instance decides expiries by the same one.
async fn db_now(conn: &mut PgConnection) -> Result<chrono::DateTime<Utc>, StoreError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(&mut *conn).await?)
}

fn is_system(actor: Uuid) -> bool {
    actor.is_nil()
}

/// A hold's placement, capture or release: group commit takes it, and
/// alone `Ledger::try_execute` decides it with [`decide_hold`].
pub(crate) fn is_hold_command(command: &LedgerCommand) -> bool {
    matches!(
        command,
        LedgerCommand::PlaceHold { .. } | LedgerCommand::CaptureHold { .. } | LedgerCommand::ReleaseHold { .. }
    )
}

/// What [`decide_hold`] came to.
pub(crate) enum AfterLocks {
    /// The session the API left to the write has ended, or its user is
    /// blocked: refused before the key is looked at, nothing recorded.
    Refused(CredentialCheck),
    /// The key was used before: its answer is replayed (or refused as reuse).
    Recorded(CommandRecord),
    Decided(Result<Decision, DomainError>),
}

/// Places, captures or releases a hold in three statements: where the hold
/// is (a capture or release names only the hold; its placement never
/// changes), then every lock in the order every path takes them (the key,
/// the payer's account for debits, the payee's shared, as
/// `group_commit::lock_group` takes a group's), then one read of the key's
/// record, the caller's session and both accounts. Locked and read one by
/// one, the same took ten round trips and a session check on a connection
/// of its own.
pub(crate) async fn decide_hold(
    conn: &mut PgConnection,
    envelope: &CommandEnvelope,
    command: LedgerCommand,
) -> Result<AfterLocks, StoreError> {
    if !is_hold_command(&command) {
        // Its key would be locked without its accounts; nothing is written.
        return Err(StoreError::Invariant("payments::decide_hold decides hold commands only"));
    }
    let read = read_hold(conn, &command, envelope).await?;
    if let Some(refusal) = read.session.filter(|check| check.refusal().is_some()) {
        return Ok(AfterLocks::Refused(refusal));
    }
    if let Some(record) = read.record {
        return Ok(AfterLocks::Recorded(record));
    }
    Ok(AfterLocks::Decided(decide_on_read(&read, envelope.actor, command)))
}

/// A hold command's accounts, locked and read.
struct HoldRead {
    now: chrono::DateTime<Utc>,
    /// The payer's and the payee's accounts; none for a hold that was never placed.
    parties: Option<(Uuid, Uuid)>,
    /// The payer's account in full, the payee's credit side, at their streams' versions.
    states: HashMap<Uuid, Known>,
    /// The key's recorded outcome, and the state of the session the API left unchecked.
    record: Option<CommandRecord>,
    session: Option<CredentialCheck>,
}

/// Locks (its idempotency key first) and reads what a hold command decides on.
async fn read_hold(
    conn: &mut PgConnection,
    command: &LedgerCommand,
    envelope: &CommandEnvelope,
) -> Result<HoldRead, StoreError> {
    let parties = match (named_parties(command), named_hold(command)) {
        (Some(parties), _) => Some(parties),
        (None, Some(hold_id)) => hold_parties(conn, hold_id).await?,
        (None, None) => None,
    };
    let debited: BTreeSet<Uuid> = parties.iter().map(|(payer, _)| *payer).collect();
    let credited: BTreeSet<Uuid> = parties.iter().map(|(_, payee)| *payee).filter(|p| !debited.contains(p)).collect();
    let key = (envelope.actor, envelope.idempotency_key.as_str());
    lock_group(conn, std::iter::once(key), &debited, &credited, KeyLocks::Wait).await?;
    let sessions: Vec<(Uuid, Uuid)> =
        envelope.unchecked_session.map(|session| (envelope.actor, session)).into_iter().collect();
    let debited: Vec<Uuid> = debited.into_iter().collect();
    let credited: Vec<Uuid> = credited.into_iter().collect();
    let accounts: Vec<Uuid> = debited.iter().chain(&credited).copied().collect();
    let mut found = read_after_locks(
        conn,
        &ReadAfterLocks {
            users: &[key.0],
            keys: &[key.1],
            accounts: &accounts,
            cached: &[],
            full: &debited,
            opening: &credited,
            sessions: &sessions,
        },
    )
    .await?;
    let record = found.records.remove(&(key.0, key.1.to_owned()));
    // One answer per pair asked for; a missing one counts as ended.
    let session = (!sessions.is_empty()).then(|| found.sessions.first().copied().unwrap_or(CredentialCheck::Ended));
    let mut states = found.full;
    states.extend(found.opening);
    Ok(HoldRead { now: found.now, parties, states, record, session })
}

/// The payer's and the payee's accounts of placed holds, in one statement
/// (a group's captures and releases): a hold never placed is not among them.
pub(crate) async fn holds_parties(
    conn: &mut PgConnection,
    hold_ids: &[Uuid],
) -> Result<HashMap<Uuid, (Uuid, Uuid)>, StoreError> {
    if hold_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<String> = hold_ids.iter().map(Uuid::to_string).collect();
    let found: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT payload->>'hold_id', payload->>'from_account', payload->>'to_account' FROM events
         WHERE event_type = 'HoldPlaced' AND payload->>'hold_id' = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let parse = |s: Option<String>| s.and_then(|s| Uuid::parse_str(&s).ok());
    Ok(found.into_iter().filter_map(|(hold, from, to)| Some((parse(hold)?, (parse(from)?, parse(to)?)))).collect())
}

/// The payer's and the payee's accounts of a placed hold.
async fn hold_parties(conn: &mut PgConnection, hold_id: Uuid) -> Result<Option<(Uuid, Uuid)>, StoreError> {
    Ok(holds_parties(conn, &[hold_id]).await?.remove(&hold_id))
}

/// Decides a hold command on what [`read_hold`] found.
fn decide_on_read(read: &HoldRead, actor: Uuid, command: LedgerCommand) -> Result<Decision, DomainError> {
    decide_on_states(read.now, read.parties, &read.states, actor, command)
}

/// The payer's and the payee's accounts a hold command names: a placement's
/// own; `None` for a capture or release, whose hold must be looked up.
pub(crate) fn named_parties(command: &LedgerCommand) -> Option<(Uuid, Uuid)> {
    match command {
        LedgerCommand::PlaceHold { from_account, to_account, .. } => Some((*from_account, *to_account)),
        _ => None,
    }
}

/// The hold a capture or release names.
pub(crate) fn named_hold(command: &LedgerCommand) -> Option<Uuid> {
    match command {
        LedgerCommand::CaptureHold { hold_id, .. } | LedgerCommand::ReleaseHold { hold_id } => Some(*hold_id),
        _ => None,
    }
}

/// Decides a hold command at the database's `now`, on the states of its
/// parties' accounts (the payer's in full, the payee's credit side, at their
/// streams' versions): pure, so a group decides it as the single path does.
pub(crate) fn decide_on_states(
    now: chrono::DateTime<Utc>,
    parties: Option<(Uuid, Uuid)>,
    states: &HashMap<Uuid, Known>,
    actor: Uuid,
    command: LedgerCommand,
) -> Result<Decision, DomainError> {
    let unknown = AccountState::default();
    let take = |id: Uuid| states.get(&id).map_or((&unknown, 0), |k| (&k.state, k.version));
    match command {
        LedgerCommand::PlaceHold { from_account, to_account, amount, expires_in_seconds, reference } => {
            let amount = parse(&amount)?;
            let (from, version) = take(from_account);
            let (to, _) = take(to_account);
            // Holds pay people: a hold to a system account would be a withdrawal without its rules.
            if to.opened.is_some() && to.kind() != Some(AccountKind::User) {
                return Err(DomainError::AccountNotFound(to_account));
            }
            let hold_id = Uuid::now_v7();
            let cmd = PlaceHold {
                hold_id,
                initiated_by: actor,
                from_account,
                to_account,
                amount,
                expires_in_seconds,
                reference,
                order_id: None,
                now,
            };
            hold::decide_place(from, to, cmd).map(|events| {
                let expires_at = match events.first() {
                    Some(Event::HoldPlaced(h)) => Some(h.expires_at),
                    _ => None,
                };
                Decision::created(
                    vec![StreamAppend { stream_id: account_stream(from_account), expected_version: version, events }],
                    json!({ "hold_id": hold_id, "expires_at": expires_at }),
                )
            })
        }
        LedgerCommand::CaptureHold { hold_id, amount } => {
            let amount = amount.as_deref().map(parse).transpose()?;
            let (from_account, from, version, to_account) = held(parties, &take, hold_id)?;
            let (to, _) = take(to_account);
            if !is_system(actor) && !hold::is_party(from, to, actor) {
                return Err(DomainError::HoldNotFound(hold_id));
            }
            if from.holds.get(&hold_id).and_then(|h| h.order_id).is_some() && !is_system(actor) {
                // An order's hold is captured by the order's acceptance, which also finishes the order.
                return Err(DomainError::validation(
                    "hold_id",
                    "belongs to an order: accept or cancel the order instead",
                ));
            }
            let transfer_id = Uuid::now_v7();
            let cmd = CaptureHold { hold_id, amount, transfer_id, now };
            hold::decide_capture(from, to, cmd).map(|events| {
                let (captured, released) = match events.first() {
                    Some(Event::HoldCaptured(c)) => (Some(c.amount), Some(c.released)),
                    _ => (None, None),
                };
                Decision::created(
                    vec![StreamAppend { stream_id: account_stream(from_account), expected_version: version, events }],
                    json!({ "hold_id": hold_id, "transfer_id": transfer_id, "amount": captured, "released": released }),
                )
            })
        }
        LedgerCommand::ReleaseHold { hold_id } => {
            let (from_account, from, version, to_account) = held(parties, &take, hold_id)?;
            let (to, _) = take(to_account);
            if !is_system(actor) && !hold::is_party(from, to, actor) {
                return Err(DomainError::HoldNotFound(hold_id));
            }
            // The payer cannot take back what a hold guarantees the payee: only
            // the payee releases early; otherwise the hold expires.
            if !is_system(actor) && !to.is_owned_by(actor) {
                return Err(DomainError::validation(
                    "hold_id",
                    "only the payee releases a hold; the payer waits for its expiry",
                ));
            }
            if from.holds.get(&hold_id).and_then(|h| h.order_id).is_some() && !is_system(actor) {
                return Err(DomainError::validation("hold_id", "belongs to an order: cancel the order instead"));
            }
            hold::decide_release(from, hold_id, now).map(|events| {
                Decision::created(
                    vec![StreamAppend { stream_id: account_stream(from_account), expected_version: version, events }],
                    json!({ "hold_id": hold_id, "status": "released" }),
                )
            })
        }
        other => Err(DomainError::validation("command", format!("{other:?} is not a hold command"))),
    }
}

/// The payer's account of a hold (id, state, stream version) and the
/// payee's account id; a hold the payer's account does not know is not found.
fn held<'a>(
    parties: Option<(Uuid, Uuid)>,
    take: &impl Fn(Uuid) -> (&'a AccountState, i64),
    hold_id: Uuid,
) -> Result<(Uuid, &'a AccountState, i64, Uuid), DomainError> {
    let Some((payer, _)) = parties else { return Err(DomainError::HoldNotFound(hold_id)) };
    let (from, version) = take(payer);
    let Some(to_account) = from.holds.get(&hold_id).map(|h| h.to_account) else {
        return Err(DomainError::HoldNotFound(hold_id));
    };
    Ok((payer, from, version, to_account))
}

pub(crate) async fn decide(conn: &mut PgConnection, actor: Uuid, command: LedgerCommand) -> Decided {
    let now = db_now(conn).await?;
    match command {
        LedgerCommand::PlaceHold { .. } | LedgerCommand::CaptureHold { .. } | LedgerCommand::ReleaseHold { .. } => {
            // `Ledger::try_execute` sends these to `decide_hold`, which checks
            // their session in its read: here none would be checked.
            Err(StoreError::Invariant("a hold command is decided by payments::decide_hold"))
        }
        LedgerCommand::ExpireHold { hold_id } => {
            let Some((from_account, from, version)) = held_account(conn, hold_id).await? else {
                return Ok(Err(DomainError::HoldNotFound(hold_id)));
            };
            let events = match hold::decide_expire(&from, hold_id, now) {
                Ok(events) => events,
                Err(e) => return Ok(Err(e)),
            };
            let mut appends =
                vec![StreamAppend { stream_id: account_stream(from_account), expected_version: version, events }];
            // An order waiting on this hold is cancelled with it.
            if let Some(order_id) = from.holds.get(&hold_id).and_then(|h| h.order_id) {
                let (order, order_version) = order_state(conn, order_id).await?;
                if let Ok(events) = order::decide_cancel(&order, order_id, CancelReason::HoldExpired) {
                    appends.push(StreamAppend {
                        stream_id: order_stream(order_id),
                        expected_version: order_version,
                        events,
                    });
                }
            }
            let decision = Decision::changed(appends, json!({ "hold_id": hold_id, "status": "expired" }));
            Ok(Ok(decision))
        }
        LedgerCommand::PlaceOrder { account_id, merchant_account, amount, description } => {
            let amount = match parse(&amount) {
                Ok(a) => a,
                Err(e) => return Ok(Err(e)),
            };
            let (account, _) = account_state(conn, account_id, false).await?;
            let (merchant, _) = account_state(conn, merchant_account, false).await?;
            let order_id = Uuid::now_v7();
            let cmd = PlaceOrder { order_id, customer_id: actor, account_id, merchant_account, amount, description };
            Ok(order::decide_place(&account, &merchant, cmd).map(|events| {
                Decision::created(
                    vec![StreamAppend { stream_id: order_stream(order_id), expected_version: 0, events }],
                    json!({ "order_id": order_id, "status": "NEW" }),
                )
            }))
        }
        LedgerCommand::PayOrder { order_id } => pay_order(conn, order_id).await,
        LedgerCommand::AcceptOrder { order_id } => accept_order(conn, actor, order_id).await,
        LedgerCommand::CancelOrder { order_id } => cancel_order(conn, actor, order_id).await,
        LedgerCommand::RefundOrder { order_id, amount, as_admin } => {
            refund_order(conn, actor, order_id, &amount, as_admin).await
        }
        other => Ok(Err(DomainError::validation("command", format!("{other:?} is not a payment command")))),
    }
}

/// The payment process's first step: hold the order's amount on the
/// customer's account, or cancel the order when that is refused.
async fn pay_order(conn: &mut PgConnection, order_id: Uuid) -> Decided {
    let now = db_now(conn).await?;
    let (order, order_version) = order_state(conn, order_id).await?;
    let Some(placed) = order.placed.clone() else { return Ok(Err(DomainError::OrderNotFound(order_id))) };
    let hold_id = Uuid::now_v7();
    // Refused by the order itself (cancelled meanwhile, already paid): nothing to do.
    if let Err(e) = order::decide_payment_held(&order, order_id, hold_id) {
        return Ok(Err(e));
    }
    lock_account(conn, placed.account_id).await?;
    let (from, version) = account_state(conn, placed.account_id, true).await?;
    lock_status_shared(conn, placed.merchant_account).await?;
    let (to, _) = account_state(conn, placed.merchant_account, false).await?;
    let cmd = PlaceHold {
        hold_id,
        initiated_by: placed.customer_id,
        from_account: placed.account_id,
        to_account: placed.merchant_account,
        amount: match Amount::new("amount", placed.amount) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        },
        expires_in_seconds: None,
        reference: Some(format!("order {order_id}")),
        order_id: Some(order_id),
        now,
    };
    match hold::decide_place(&from, &to, cmd) {
        Ok(hold_events) => {
            let order_events = match order::decide_payment_held(&order, order_id, hold_id) {
                Ok(e) => e,
                Err(e) => return Ok(Err(e)),
            };
            let d = Decision::changed(
                vec![
                    StreamAppend {
                        stream_id: account_stream(placed.account_id),
                        expected_version: version,
                        events: hold_events,
                    },
                    StreamAppend {
                        stream_id: order_stream(order_id),
                        expected_version: order_version,
                        events: order_events,
                    },
                ],
                json!({ "order_id": order_id, "hold_id": hold_id, "status": "NEW" }),
            );
            Ok(Ok(d))
        }
        Err(refusal) => {
            let reason = match refusal {
                DomainError::InsufficientFunds { .. } => CancelReason::InsufficientFunds,
                _ => CancelReason::PaymentRefused,
            };
            Ok(order::decide_cancel(&order, order_id, reason).map(|events| {
                Decision::changed(
                    vec![StreamAppend { stream_id: order_stream(order_id), expected_version: order_version, events }],
                    json!({ "order_id": order_id, "status": "CANCELLED", "reason": reason }),
                )
            }))
        }
    }
}

/// The merchant's acceptance (or the auto-accept policy): capture the whole
/// hold and finish the order, in one step.
async fn accept_order(conn: &mut PgConnection, actor: Uuid, order_id: Uuid) -> Decided {
    let now = db_now(conn).await?;
    let (order, order_version) = order_state(conn, order_id).await?;
    let Some(placed) = order.placed.clone() else { return Ok(Err(DomainError::OrderNotFound(order_id))) };
    lock_account(conn, placed.account_id).await?;
    let (from, version) = account_state(conn, placed.account_id, true).await?;
    lock_status_shared(conn, placed.merchant_account).await?;
    let (to, _) = account_state(conn, placed.merchant_account, false).await?;
    // Only the merchant learns anything about the order's state.
    if !is_system(actor) && !to.is_owned_by(actor) {
        return Ok(Err(DomainError::OrderNotFound(order_id)));
    }
    let transfer_id = Uuid::now_v7();
    if let Err(e) = order::decide_finish(&order, order_id, transfer_id, placed.amount) {
        return Ok(Err(e));
    }
    let Some(hold_id) = order.hold_id else {
        return Ok(Err(DomainError::OrderNotInStatus(order_id, "paid for")));
    };
    let mut hold_events =
        match hold::decide_capture(&from, &to, CaptureHold { hold_id, amount: None, transfer_id, now }) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
    if is_system(actor) {
        // Accepted by the auto-accept policy, not by anyone's request.
        for event in &mut hold_events {
            if let Event::TransferRecorded(t) = event {
                t.channel = ledger_domain::events::Channel::System;
            }
        }
    }
    Ok(order::decide_finish(&order, order_id, transfer_id, placed.amount).map(|order_events| {
        Decision::changed(
            vec![
                StreamAppend {
                    stream_id: account_stream(placed.account_id),
                    expected_version: version,
                    events: hold_events,
                },
                StreamAppend {
                    stream_id: order_stream(order_id),
                    expected_version: order_version,
                    events: order_events,
                },
            ],
            json!({ "order_id": order_id, "status": "FINISHED", "transfer_id": transfer_id }),
        )
    }))
}

/// The customer cancels a NEW order; its hold, if any, is released with it.
async fn cancel_order(conn: &mut PgConnection, actor: Uuid, order_id: Uuid) -> Decided {
    let now = db_now(conn).await?;
    let (order, order_version) = order_state(conn, order_id).await?;
    let Some(placed) = order.placed.clone() else { return Ok(Err(DomainError::OrderNotFound(order_id))) };
    if !is_system(actor) && placed.customer_id != actor {
        return Ok(Err(DomainError::OrderNotFound(order_id)));
    }
    let order_events = match order::decide_cancel(&order, order_id, CancelReason::CustomerCancelled) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let mut appends = vec![];
    if let Some(hold_id) = order.hold_id {
        lock_account(conn, placed.account_id).await?;
        let (from, version) = account_state(conn, placed.account_id, true).await?;
        match hold::decide_release(&from, hold_id, now) {
            Ok(events) => appends.push(StreamAppend {
                stream_id: account_stream(placed.account_id),
                expected_version: version,
                events,
            }),
            // Expired already: its expiry cancels the order; nothing to release.
            Err(DomainError::HoldNotPending(_)) => {}
            Err(e) => return Ok(Err(e)),
        }
    }
    appends.push(StreamAppend {
        stream_id: order_stream(order_id),
        expected_version: order_version,
        events: order_events,
    });
    let d = Decision::changed(appends, json!({ "order_id": order_id, "status": "CANCELLED" }));
    Ok(Ok(d))
}

/// Pays the customer back from the merchant's account, within what was captured.
async fn refund_order(conn: &mut PgConnection, actor: Uuid, order_id: Uuid, amount: &str, as_admin: bool) -> Decided {
    let amount = match parse(amount) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let (order, order_version) = order_state(conn, order_id).await?;
    let Some(placed) = order.placed.clone() else { return Ok(Err(DomainError::OrderNotFound(order_id))) };
    lock_account(conn, placed.merchant_account).await?;
    let (merchant, version) = account_state(conn, placed.merchant_account, true).await?;
    let Some(merchant_owner) = merchant.opened.as_ref().and_then(|a| a.owner_id) else {
        return Ok(Err(DomainError::OrderNotFound(order_id)));
    };
    if !as_admin && merchant_owner != actor {
        return Ok(Err(DomainError::OrderNotFound(order_id)));
    }
    lock_status_shared(conn, placed.account_id).await?;
    let (customer, _) = account_state(conn, placed.account_id, false).await?;
    let transfer_id = Uuid::now_v7();
    // The order's own limit first: a refund beyond the captured amount is
    // refused as such, whatever the merchant's balance.
    let Some(currency) = ledger_domain::Currency::from_code(&placed.currency) else {
        return Ok(Err(DomainError::OrderNotFound(order_id)));
    };
    let requested = match amount.in_currency("amount", currency) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let order_events = match order::decide_refund(&order, order_id, transfer_id, requested) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let money = match account::decide_transfer(
        &merchant,
        &customer,
        MoveMoney {
            transfer_id,
            kind: TransferKind::Refund,
            initiated_by: merchant_owner,
            from_account: placed.merchant_account,
            to_account: placed.account_id,
            amount,
            reference: Some(format!("refund of order {order_id}")),
            fee: None,
        },
    ) {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(Decision::created(
        vec![
            StreamAppend {
                stream_id: account_stream(placed.merchant_account),
                expected_version: version,
                events: money,
            },
            StreamAppend { stream_id: order_stream(order_id), expected_version: order_version, events: order_events },
        ],
        json!({ "order_id": order_id, "transfer_id": transfer_id, "amount": requested }),
    )))
}
