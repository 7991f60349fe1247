//! The ledger's domain: events, commands and deciders. Pure: no IO, no async.
//!
//! Every decider is a pair of functions: `decide(&State, Command) ->
//! Result<Vec<Event>, DomainError>` and `evolve(State, &Event) -> State`.

pub mod account;
pub mod canonical;
mod currency;
mod error;
pub mod events;
pub mod fees;
pub mod hold;
pub mod money;
pub mod order;
pub mod user;

pub use currency::Currency;
pub use error::DomainError;
pub use events::Event;

use events::AccountKind;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One account's balance as a fold of the whole log computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct FoldedBalance {
    pub currency: String,
    pub kind: AccountKind,
    pub balance: Decimal,
}

/// Folds a whole log into per-account balances: the reference every read
/// model and every invariant check is compared against.
pub fn fold_balances<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeMap<Uuid, FoldedBalance> {
    let mut balances = BTreeMap::new();
    for event in events {
        fold_balance(&mut balances, event);
    }
    balances
}

/// One step of [`fold_balances`], for a log read in pages.
pub fn fold_balance(balances: &mut BTreeMap<Uuid, FoldedBalance>, event: &Event) {
    match event {
        Event::AccountOpened(a) => {
            balances.entry(a.account_id).or_insert(FoldedBalance {
                currency: a.currency.clone(),
                kind: a.kind,
                balance: Decimal::ZERO,
            });
        }
        Event::TransferRecorded(t) => {
            if let Some(b) = balances.get_mut(&t.from_account) {
                b.balance -= t.amount;
            }
            if let Some(b) = balances.get_mut(&t.to_account) {
                b.balance += t.amount;
            }
        }
        _ => {}
    }
}

/// Sum of all balances per currency; conservation says each is exactly zero.
pub fn sums_per_currency(balances: &BTreeMap<Uuid, FoldedBalance>) -> BTreeMap<String, Decimal> {
    let mut sums = BTreeMap::new();
    for b in balances.values() {
        *sums.entry(b.currency.clone()).or_insert(Decimal::ZERO) += b.balance;
    }
    sums
}
