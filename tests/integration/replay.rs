use crate::harness::TestLedger;
use serde_json::json;

async fn dump(t: &TestLedger, table: &str, order: &str) -> Vec<String> {
    sqlx::query_scalar(&format!("SELECT row_to_json(r)::text FROM {table} r ORDER BY {order}"))
        .fetch_all(&t.pool)
        .await
        .unwrap()
}

async fn dumps(t: &TestLedger) -> Vec<Vec<String>> {
    vec![
        dump(t, "balances", "account_id").await,
        dump(t, "statement_entries", "account_id, entry_no").await,
        dump(t, "transfers", "transfer_id").await,
    ]
}

fn ledger_cli(t: &TestLedger, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("LEDGER_DATABASE_URL", &t.config.database_url)
        .env("LEDGER_JWT_SECRET", "integration-test-secret-integration-test")
        .output()
        .expect("ledger runs")
}

#[tokio::test]
async fn replay_rebuilds_byte_identical_read_models() {
    let t = TestLedger::start().await;
    let mut accounts = vec![];
    for currency in ["USD", "EUR", "USD", "JPY"] {
        let (_, token) = t.user().await;
        let account = t.account(&token, currency).await;
        t.deposit(&token, &account, if currency == "JPY" { "5000" } else { "120.10" }).await;
        accounts.push((token, account, currency));
    }
    for round in 0..5 {
        let (token, from, _) = &accounts[0];
        let (_, to, _) = &accounts[2];
        t.post(
            "/v1/transfers",
            token,
            json!({"from_account": from, "to_account": to, "amount": format!("{}.01", round + 1)}),
        )
        .await;
        let (token, from, _) = &accounts[1];
        t.post(&format!("/v1/accounts/{from}/withdrawals"), token, json!({"amount": "3.30"})).await;
    }
    t.settle().await;
    let before = dumps(&t).await;
    assert!(before[0].len() >= 7 && before[1].len() >= 20);

    let out = ledger_cli(&t, &["replay", "--all"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before, "replay --all rebuilds the same bytes");

    let out = ledger_cli(&t, &["replay", "--projection", "balances"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before);

    let out = ledger_cli(&t, &["replay", "--projection", "nonsense"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown projection"));

    // The live projectors carry on from the rebuilt checkpoints without doubling anything.
    let (token, account, _) = &accounts[0];
    let p = t.deposit(token, account, "1.00").await;
    t.balance(token, account, p).await;
    t.assert_invariants().await;
    t.cleanup().await;
}
