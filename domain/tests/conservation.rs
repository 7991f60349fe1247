//! Property: any sequence of commands (movements with fees, holds, captures,
//! releases, expiries, with time passing) keeps every currency's sum at zero,
//! no user account's available funds below zero, and every capture within
//! its hold, whatever the deciders accept or refuse.

use chrono::{Duration, Utc};
use ledger_domain::account::{
    self, fee_account_id, system_account_id, AccountCommand, AccountState, HoldStatus, MoveMoney,
};
use ledger_domain::events::{AccountKind, TransferKind};
use ledger_domain::fees::FeeSchedule;
use ledger_domain::hold::{self, CaptureHold, PlaceHold};
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
    Hold { from: usize, to: usize, cents: u64, seconds: i64 },
    Capture { hold: usize, cents: Option<u64> },
    Release { hold: usize },
    Expire { hold: usize },
    Wait { seconds: i64 },
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
        (0..6usize, 0..6usize, 1..50_000u64, 1..600i64).prop_map(|(from, to, cents, seconds)| Op::Hold {
            from,
            to,
            cents,
            seconds
        }),
        (0..8usize, prop::option::of(1..50_000u64)).prop_map(|(hold, cents)| Op::Capture { hold, cents }),
        (0..8usize).prop_map(|hold| Op::Release { hold }),
        (0..8usize).prop_map(|hold| Op::Expire { hold }),
        (1..400i64).prop_map(|seconds| Op::Wait { seconds }),
    ]
}

struct World {
    log: Vec<Event>,
    states: BTreeMap<Uuid, AccountState>,
    accounts: Vec<(Uuid, Uuid, Currency)>,
    /// (hold id, held account) in placement order.
    holds: Vec<(Uuid, Uuid)>,
    now: chrono::DateTime<Utc>,
    fees: FeeSchedule,
}

impl World {
    fn new() -> World {
        let users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        let mut w = World {
            log: vec![],
            states: BTreeMap::new(),
            accounts: vec![],
            holds: vec![],
            now: Utc::now(),
            fees: FeeSchedule::parse("transfer:0.5%:0.10,withdrawal:1%:0.50:20").unwrap(),
        };
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
                let events =
                    account::decide(&AccountState::default(), AccountCommand::OpenFeeAccount { currency }).unwrap();
                w.apply(fee_account_id(currency), events);
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
                Event::HoldPlaced(h) => {
                    self.holds.push((h.hold_id, h.from_account));
                    vec![h.from_account]
                }
                Event::HoldCaptured(h) => vec![h.from_account],
                Event::HoldReleased(h) => vec![h.from_account],
                Event::HoldExpired(h) => vec![h.from_account],
                _ => vec![],
            };
            for id in touched {
                let s = self.states.remove(&id).unwrap_or_default();
                self.states.insert(id, account::evolve(s, &e));
            }
            self.log.push(e);
        }
    }

    fn hold_op(&mut self, op: Op) {
        let empty = AccountState::default();
        let pick = |hold: usize, holds: &[(Uuid, Uuid)]| (!holds.is_empty()).then(|| holds[hold % holds.len()]);
        let decided = match op {
            Op::Hold { from, to, cents, seconds } => {
                let (f, owner, c) = self.accounts[from];
                let (t, _, _) = self.accounts[to];
                let cmd = PlaceHold {
                    hold_id: Uuid::new_v4(),
                    initiated_by: owner,
                    from_account: f,
                    to_account: t,
                    amount: amount(cents, c),
                    expires_in_seconds: Some(seconds),
                    reference: None,
                    order_id: None,
                    now: self.now,
                };
                hold::decide_place(self.states.get(&f).unwrap_or(&empty), self.states.get(&t).unwrap_or(&empty), cmd)
            }
            Op::Capture { hold, cents } => {
                let Some((id, f)) = pick(hold, &self.holds) else { return };
                let from = &self.states[&f];
                let to = &self.states[&from.holds[&id].to_account];
                let c = from.currency().unwrap();
                let cmd = CaptureHold {
                    hold_id: id,
                    amount: cents.map(|x| amount(x, c)),
                    transfer_id: Uuid::new_v4(),
                    now: self.now,
                };
                hold::decide_capture(from, to, cmd)
            }
            Op::Release { hold } => {
                let Some((id, f)) = pick(hold, &self.holds) else { return };
                hold::decide_release(&self.states[&f], id, self.now)
            }
            Op::Expire { hold } => {
                let Some((id, f)) = pick(hold, &self.holds) else { return };
                hold::decide_expire(&self.states[&f], id, self.now)
            }
            Op::Wait { seconds } => {
                self.now += Duration::seconds(seconds);
                return;
            }
            _ => return,
        };
        if let Ok(events) = decided {
            self.apply(Uuid::nil(), events);
        }
    }

    fn run(&mut self, op: Op) {
        if matches!(op, Op::Hold { .. } | Op::Capture { .. } | Op::Release { .. } | Op::Expire { .. } | Op::Wait { .. })
        {
            return self.hold_op(op);
        }
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
            _ => return,
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
            fee: self.fees.rule(kind),
        };
        if let Ok(events) = account::decide_transfer(from_state, to_state, cmd) {
            self.apply(from, events);
        }
    }
}

fn amount(cents: u64, c: Currency) -> Amount {
    let d = Decimal::new(cents as i64, 2);
    let mut d = d.round_dp(c.minor_units());
    d.rescale(c.minor_units().min(2));
    Amount::new("amount", d.max(Decimal::ONE)).unwrap()
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
                if b.kind == AccountKind::User {
                    prop_assert!(world.states[id].available() >= Decimal::ZERO, "{id} has {} available", world.states[id].available());
                }
            }
            // captured <= held, and a hold is resolved at most once.
            let mut resolved: BTreeMap<Uuid, usize> = BTreeMap::new();
            for e in &world.log {
                match e {
                    Event::HoldCaptured(c) => {
                        let held = hold::held(&world.states[&c.from_account], c.hold_id).unwrap();
                        prop_assert!(c.amount <= held && c.amount + c.released == held);
                        *resolved.entry(c.hold_id).or_default() += 1;
                    }
                    Event::HoldReleased(r) => *resolved.entry(r.hold_id).or_default() += 1,
                    Event::HoldExpired(x) => *resolved.entry(x.hold_id).or_default() += 1,
                    _ => {}
                }
            }
            prop_assert!(resolved.values().all(|n| *n == 1), "{resolved:?}");
            for (id, f) in &world.holds {
                let status = world.states[f].holds[id].status;
                prop_assert_eq!(status != HoldStatus::Pending, resolved.contains_key(id));
            }
        }
    }
}
