use crate::harness::TestLedger;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn two_hundred_concurrent_withdrawals_never_overdraw() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    t.deposit(&ann, &a, "100.00").await;
    let path = format!("/v1/accounts/{a}/withdrawals");
    let answers = futures::future::join_all((0..200).map(|_| t.post(&path, &ann, json!({"amount": "1.00"})))).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let short = answers
        .iter()
        .filter(|(s, v)| *s == StatusCode::UNPROCESSABLE_ENTITY && v["type"] == "/problems/insufficient-funds")
        .count();
    assert_eq!(
        (ok, short),
        (100, 100),
        "{:?}",
        answers.iter().find(|(s, _)| *s != StatusCode::CREATED && *s != StatusCode::UNPROCESSABLE_ENTITY)
    );
    t.settle().await;
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "0.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn concurrent_transfers_between_accounts_conserve_money() {
    let t = TestLedger::start().await;
    let mut users = vec![];
    for _ in 0..4 {
        let (_, token) = t.user().await;
        let account = t.account(&token, "EUR").await;
        t.deposit(&token, &account, "50.00").await;
        users.push((token, account));
    }
    // Everyone pays everyone at once, many times: debits race credits on every account.
    let mut calls = vec![];
    for round in 0..10 {
        for (i, (token, from)) in users.iter().enumerate() {
            let (_, to) = &users[(i + 1 + round % 3) % users.len()];
            calls.push(t.post(
                "/v1/transfers",
                token,
                json!({"from_account": from, "to_account": to, "amount": "7.00"}),
            ));
        }
    }
    let answers = futures::future::join_all(calls).await;
    for (s, v) in &answers {
        assert!(*s == StatusCode::CREATED || v["type"] == "/problems/insufficient-funds", "{s} {v}");
    }
    t.assert_invariants().await;
    t.cleanup().await;
}
