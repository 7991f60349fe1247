//! Property: any sequence of commands keeps every currency's sum at zero and no
//! user account below zero, whatever the deciders accept or refuse.

use ledger_domain::account::{self, system_account_id, AccountCommand, AccountState, MoveMoney};
use ledger_domain::events::{AccountKind, TransferKind};
use ledger_domain::money::Amount;
use ledger_domain::{fold_balances, sums_per_currency, Currency, Event};
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Op {
    Deposit { account: usize, cents: u64 },
    Withdraw { account: usize, cents: u64 },
    Transfer { from: usize, to: usize, cents: u64, as_owner: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6usize, 1..50_000u64).prop_map(|(account, cents)| Op::Deposit { account, cents }),
        (0..6usize, 1..50_000u64).prop_map(|(account, cents)| Op::Withdraw { account, cents }),
        (0..6usize, 0..6usize, 1..50_000u64, any::<bool>()).prop_map(|(from, to, cents, as_owner)| Op::Transfer {
            from,
            to,
            cents,
            as_owner
        }),
    ]
}

struct World {
    log: Vec<Event>,
    states: BTreeMap<Uuid, AccountState>,
    accounts: Vec<(Uuid, Uuid, Currency)>,
}

impl World {
    fn new() -> World {
        let users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let mut w = World { log: vec![], states: BTreeMap::new(), accounts: vec![] };
        for (i, code) in ["USD", "USD", "EUR", "USD", "JPY", "EUR"].iter().enumerate() {
            let currency = Currency::from_code(code).unwrap();
            let id = Uuid::new_v4();
            let owner = users[i % 3];
            let events = account::decide(
                &AccountState::default(),
                AccountCommand::Open { account_id: id, owner_id: owner, currency: code.to_string(), name: None },
            )
            .unwrap();
            w.apply(id, events);
            let sys = system_account_id(currency);
            if !w.states.contains_key(&sys) {
                let events =
                    account::decide(&AccountState::default(), AccountCommand::OpenSystem { currency }).unwrap();
                w.apply(sys, events);
            }
            w.accounts.push((id, owner, currency));
        }
        w
    }

    fn apply(&mut self, _id: Uuid, events: Vec<Event>) {
        for e in events {
            let touched: Vec<Uuid> = match &e {
                Event::AccountOpened(a) => vec![a.account_id],
                Event::TransferRecorded(t) => vec![t.from_account, t.to_account],
                _ => vec![],
            };
            for id in touched {
                let s = self.states.remove(&id).unwrap_or_default();
                self.states.insert(id, account::evolve(s, &e));
            }
            self.log.push(e);
        }
    }

    fn run(&mut self, op: Op) {
        let amount = |cents: u64, c: Currency| {
            let d = Decimal::new(cents as i64, 2);
            let mut d = d.round_dp(c.minor_units());
            d.rescale(c.minor_units().min(2));
            Amount::new("amount", d.max(Decimal::ONE)).unwrap()
        };
        let (kind, by, from, to, amt) = match op {
            Op::Deposit { account, cents } => {
                let (id, owner, c) = self.accounts[account];
                (TransferKind::Deposit, owner, system_account_id(c), id, amount(cents, c))
            }
            Op::Withdraw { account, cents } => {
                let (id, owner, c) = self.accounts[account];
                (TransferKind::Withdrawal, owner, id, system_account_id(c), amount(cents, c))
            }
            Op::Transfer { from, to, cents, as_owner } => {
                let (f, owner, c) = self.accounts[from];
                let (t, other, _) = self.accounts[to];
                (TransferKind::Transfer, if as_owner { owner } else { other }, f, t, amount(cents, c))
            }
        };
        let empty = AccountState::default();
        let from_state = self.states.get(&from).unwrap_or(&empty);
        let to_state = self.states.get(&to).unwrap_or(&empty);
        let cmd = MoveMoney {
            transfer_id: Uuid::new_v4(),
            kind,
            initiated_by: by,
            from_account: from,
            to_account: to,
            amount: amt,
            reference: None,
        };
        if let Ok(events) = account::decide_transfer(from_state, to_state, cmd) {
            self.apply(from, events);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn every_currency_sums_to_zero_and_no_user_account_is_negative(ops in prop::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        for op in ops {
            world.run(op);
            let balances = fold_balances(&world.log);
            for (currency, sum) in sums_per_currency(&balances) {
                prop_assert!(sum.is_zero(), "{currency} sums to {sum}");
            }
            for (id, b) in &balances {
                if b.kind == AccountKind::User {
                    prop_assert!(b.balance >= Decimal::ZERO, "{id} is at {}", b.balance);
                }
                // The per-account decider state agrees with the whole-log fold.
                prop_assert_eq!(world.states[id].balance, b.balance);
            }
        }
    }
}
