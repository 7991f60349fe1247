//! Random command sequences through the public API, checked against a simple
//! model and against the ledger's invariants after every sequence.

use crate::harness::TestLedger;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::json;
use std::str::FromStr;

#[derive(Debug, Clone)]
enum Op {
    Deposit { account: usize, cents: u32 },
    Withdraw { account: usize, cents: u32 },
    Transfer { from: usize, to: usize, cents: u32 },
}

/// Four accounts: two USD (owners 0 and 1), one EUR (owner 0), one USD (owner 2).
const CURRENCIES: [&str; 4] = ["USD", "USD", "EUR", "USD"];
const OWNERS: [usize; 4] = [0, 1, 0, 2];

fn op() -> impl Strategy<Value = Op> {
    let account = 0..CURRENCIES.len();
    let cents = 1u32..5_000;
    prop_oneof![
        (account.clone(), cents.clone()).prop_map(|(account, cents)| Op::Deposit { account, cents }),
        (account.clone(), cents.clone()).prop_map(|(account, cents)| Op::Withdraw { account, cents }),
        (account.clone(), account, cents).prop_map(|(from, to, cents)| Op::Transfer { from, to, cents }),
    ]
}

fn money(cents: u32) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[test]
fn random_command_sequences_keep_every_invariant() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let t = runtime.block_on(TestLedger::start());
    let (tokens, accounts) = runtime.block_on(async {
        let mut tokens = vec![];
        for _ in 0..3 {
            tokens.push(t.user().await.1);
        }
        let mut accounts = vec![];
        for (i, currency) in CURRENCIES.iter().enumerate() {
            accounts.push(t.account(&tokens[OWNERS[i]], currency).await);
        }
        (tokens, accounts)
    });
    // The model carries over between cases: each case continues on the same ledger.
    let state = std::cell::Cell::new([0i64; 4]);

    let mut runner =
        TestRunner::new(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() });
    let result = runner.run(&proptest::collection::vec(op(), 1..25), |ops| {
        let mut model = state.get();
        let outcome = runtime.block_on(async {
            for op in ops {
                match op {
                    Op::Deposit { account, cents } => {
                        let path = format!("/v1/accounts/{}/deposits", accounts[account]);
                        let (s, v) = t.post(&path, &tokens[OWNERS[account]], json!({"amount": money(cents)})).await;
                        prop_assert_eq!(s, StatusCode::CREATED, "{}", v);
                        model[account] += i64::from(cents);
                    }
                    Op::Withdraw { account, cents } => {
                        let path = format!("/v1/accounts/{}/withdrawals", accounts[account]);
                        let (s, v) = t.post(&path, &tokens[OWNERS[account]], json!({"amount": money(cents)})).await;
                        if model[account] >= i64::from(cents) {
                            prop_assert_eq!(s, StatusCode::CREATED, "{}", v);
                            model[account] -= i64::from(cents);
                        } else {
                            prop_assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{}", v);
                            prop_assert_eq!(&v["type"], "/problems/insufficient-funds");
                        }
                    }
                    Op::Transfer { from, to, cents } => {
                        let body =
                            json!({"from_account": accounts[from], "to_account": accounts[to], "amount": money(cents)});
                        let (s, v) = t.post("/v1/transfers", &tokens[OWNERS[from]], body).await;
                        let expected = if from == to {
                            Some("/problems/same-account")
                        } else if CURRENCIES[from] != CURRENCIES[to] {
                            Some("/problems/currency-mismatch")
                        } else if model[from] < i64::from(cents) {
                            Some("/problems/insufficient-funds")
                        } else {
                            None
                        };
                        match expected {
                            None => {
                                prop_assert_eq!(s, StatusCode::CREATED, "{}", v);
                                model[from] -= i64::from(cents);
                                model[to] += i64::from(cents);
                            }
                            Some(problem) => {
                                prop_assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{}", v);
                                prop_assert_eq!(&v["type"], problem);
                            }
                        }
                    }
                }
            }
            let head = t.head().await;
            for (i, account) in accounts.iter().enumerate() {
                let shown = Decimal::from_str(&t.balance(&tokens[OWNERS[i]], account, head).await).expect("decimal");
                prop_assert_eq!(shown, Decimal::new(model[i], 2), "account {}", i);
            }
            t.assert_invariants().await;
            Ok::<(), TestCaseError>(())
        });
        state.set(model);
        outcome
    });
    runtime.block_on(t.cleanup());
    if let Err(e) = result {
        panic!("{e}");
    }
}
