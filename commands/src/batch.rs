//! All-or-none transfer batches: every item decided against the states the
//! earlier items left, in one transaction, or none at all.
//!
//! Each item carries its own Idempotency-Key, fingerprinted exactly like a
//! single `POST /v1/transfers` with the same body, so an item and a single
//! transfer with one key are the same request: a retried item moves nothing
//! twice, whichever way it comes back.

use crate::idempotency;
use crate::ledger::{account_state, Decision};
use crate::store::{account_stream, StoreError, StreamAppend};
use ledger_domain::account::{self, AccountCommand, AccountState, MoveMoney};
use ledger_domain::events::{Event, TransferKind};
use ledger_domain::fees::FeeSchedule;
use ledger_domain::money::Amount;
use ledger_domain::DomainError;
use serde_json::{json, Value};
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

pub const MAX_ITEMS: usize = 1_000;

#[derive(Clone, Debug)]
pub struct BatchItem {
    pub key: String,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: String,
    pub reference: Option<String>,
}

impl BatchItem {
    /// The fingerprint a single `POST /v1/transfers` with this body has.
    pub fn request_hash(&self) -> Vec<u8> {
        let mut body = json!({
            "from_account": self.from_account,
            "to_account": self.to_account,
            "amount": self.amount,
        });
        if let Some(r) = &self.reference {
            body["reference"] = json!(r);
        }
        idempotency::request_hash("POST", "/v1/transfers", &ledger_domain::canonical::to_string(&body))
    }
}

/// An item's idempotency record, written with the batch.
pub(crate) struct ItemRecord {
    pub key: String,
    pub request_hash: Vec<u8>,
    pub body: Value,
}

fn item_error(index: usize, error: DomainError) -> DomainError {
    DomainError::BatchItem { index, error: Box::new(error) }
}

pub(crate) async fn decide(
    conn: &mut PgConnection,
    actor: Uuid,
    items: Vec<BatchItem>,
    fees: &FeeSchedule,
) -> Result<Result<(Decision, Vec<ItemRecord>), DomainError>, StoreError> {
    // Locks in one order everywhere: item keys, then debited accounts, then
    // credited ones, each sorted; every step one statement for the batch.
    // The accounts of items that turn out to be replays are locked and read
    // too: harmless, and it makes the whole read one statement after the locks.
    use crate::group_commit as set;
    let debited: BTreeSet<Uuid> = items.iter().map(|i| i.from_account).collect();
    let credited: BTreeSet<Uuid> = items.iter().map(|i| i.to_account).filter(|a| !debited.contains(a)).collect();
    set::lock_group(conn, items.iter().map(|i| (actor, i.key.as_str())), &debited, &credited, set::KeyLocks::Wait)
        .await?;
    let users = vec![actor; items.len()];
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let debited: Vec<Uuid> = debited.into_iter().collect();
    let credited: Vec<Uuid> = credited.into_iter().collect();
    let all: Vec<Uuid> = debited.iter().chain(credited.iter()).copied().collect();
    let found = set::read_after_locks(
        conn,
        &set::ReadAfterLocks {
            users: &users,
            keys: &keys,
            accounts: &all,
            cached: &[],
            full: &debited,
            opening: &credited,
            sessions: &[],
        },
    )
    .await?;
    let previous = found.records;
    let mut results = vec![Value::Null; items.len()];
    let mut todo = vec![];
    for (index, item) in items.iter().enumerate() {
        match previous.get(&(actor, item.key.clone())) {
            // A key whose request was refused cannot be part of an all-or-none batch
            // that succeeds: its answer stays the refusal.
            Some(previous) if previous.request_hash == item.request_hash() && previous.status >= 300 => {
                return Ok(Err(item_error(
                    index,
                    DomainError::validation("key", "belongs to a transfer that was refused; use a new key"),
                )))
            }
            Some(previous) if previous.request_hash == item.request_hash() => {
                results[index] =
                    json!({ "key": item.key, "status": previous.status, "body": previous.response, "replayed": true });
            }
            Some(_) => {
                return Ok(Err(item_error(
                    index,
                    DomainError::validation("key", "was already used for a different request"),
                )))
            }
            None => todo.push(index),
        }
    }
    let mut states: BTreeMap<Uuid, (AccountState, i64)> =
        found.full.into_iter().chain(found.opening).map(|(id, known)| (id, (known.state, known.version))).collect();
    let fee = fees.rule(TransferKind::Transfer);
    let mut appends = vec![];
    let mut opened_fee_accounts = BTreeSet::new();
    let mut records = vec![];
    for index in todo {
        let item = &items[index];
        let amount = match Amount::parse("amount", &item.amount) {
            Ok(a) => a,
            Err(e) => return Ok(Err(item_error(index, e))),
        };
        let empty = (AccountState::default(), 0);
        let from = states.get(&item.from_account).unwrap_or(&empty).0.clone();
        let to = states.get(&item.to_account).unwrap_or(&empty).0.clone();
        if let (Some(_), Some(currency)) = (fee, from.currency()) {
            if opened_fee_accounts.insert(currency.code()) {
                let id = account::fee_account_id(currency);
                let (fee_state, _) = account_state(conn, id, false).await?;
                if fee_state.opened.is_none() {
                    if let Ok(events) = account::decide(&fee_state, AccountCommand::OpenFeeAccount { currency }) {
                        appends.push(StreamAppend { stream_id: account_stream(id), expected_version: 0, events });
                    }
                }
            }
        }
        let transfer_id = Uuid::now_v7();
        let decided = account::decide_transfer(
            &from,
            &to,
            MoveMoney {
                transfer_id,
                kind: TransferKind::Transfer,
                initiated_by: actor,
                from_account: item.from_account,
                to_account: item.to_account,
                amount,
                reference: item.reference.clone(),
                fee,
            },
        );
        let events = match decided {
            Ok(e) => e,
            Err(e) => return Ok(Err(item_error(index, e))),
        };
        // Later items see this one's effect.
        for account_id in [item.from_account, item.to_account] {
            if let Some((state, _)) = states.get_mut(&account_id) {
                *state = events.iter().fold(std::mem::take(state), account::evolve);
            }
        }
        let version = states.get(&item.from_account).map(|(_, v)| *v).unwrap_or_default();
        let mut body = json!({ "transfer_id": transfer_id });
        if let Some(Event::TransferRecorded(f)) =
            events.iter().find(|e| matches!(e, Event::TransferRecorded(t) if t.kind == TransferKind::Fee))
        {
            body["fee"] = json!({ "transfer_id": f.transfer_id, "amount": f.amount, "account": f.to_account });
        }
        if let Some((_, v)) = states.get_mut(&item.from_account) {
            *v += events.len() as i64;
        }
        appends.push(StreamAppend { stream_id: account_stream(item.from_account), expected_version: version, events });
        results[index] = json!({ "key": item.key, "status": 201, "body": body.clone(), "replayed": false });
        records.push(ItemRecord { key: item.key.clone(), request_hash: item.request_hash(), body });
    }
    let decision = Decision::created(appends, json!({ "atomic": true, "results": results }));
    Ok(Ok((decision, records)))
}
