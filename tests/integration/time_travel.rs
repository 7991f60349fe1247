//! Balances in the past and statements for a period, checked against a fold
//! of the log.

use crate::harness::{FundedPair, TestLedger};
use ledger_domain::{fold_balances, Event};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::json;
use std::str::FromStr;
use std::time::Duration;

#[tokio::test]
async fn balances_as_of_any_position_match_a_fold_of_the_log() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("USD", "100.00").await;
    for amount in ["10.00", "20.00", "0.01"] {
        let (s, _) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": amount})).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, hold) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": b, "amount": "5.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "{hold}");
    t.settle().await;
    let log = t.log().await;
    let account: uuid::Uuid = a.parse().unwrap();
    let mut prefix: Vec<Event> = vec![];
    for recorded in &log {
        prefix.push(recorded.decode().unwrap());
        let Some(folded) = fold_balances(&prefix).get(&account).map(|b| b.balance) else { continue };
        let (s, v) = t.get(&format!("/v1/accounts/{a}?as_of_position={}", recorded.position), &ann).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(Decimal::from_str(v["balance"].as_str().unwrap()).unwrap(), folded, "at {}", recorded.position);
        assert_eq!(v["as_of"]["position"], recorded.position);
    }
    let head = t.head().await;
    let (_, now) = t.get(&format!("/v1/accounts/{a}?as_of_position={head}"), &ann).await;
    assert_eq!((now["balance"].as_str(), now["available"].as_str()), (Some("69.99"), Some("64.99")), "the hold counts");
    let (_, before) = t.get(&format!("/v1/accounts/{a}?as_of=2000-01-01T00:00:00Z"), &ann).await;
    assert_eq!(before["balance"], "0.00");
    let (s, _) = t.get(&format!("/v1/accounts/{a}?as_of_position=999999"), &ann).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = t.get(&format!("/v1/accounts/{a}?as_of=yesterday"), &ann).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    t.cleanup().await;
}

#[tokio::test]
async fn a_statement_for_a_period_opens_and_closes_on_the_fold() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("EUR", "100.00").await;
    let (_, _) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "10.00"})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, _) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "20.00"})).await;
    let (_, _) = t.post(&format!("/v1/accounts/{a}/deposits"), &ann, json!({"amount": "5.00"})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let to = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, _) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "1.00"})).await;
    let head = t.head().await;
    let q =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).replace('+', "%2B");
    let (s, v) =
        t.get(&format!("/v1/accounts/{a}/statement?from={}&to={}&min_position={head}", q(from), q(to)), &ann).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["opening_balance"], "90.00");
    let amounts: Vec<&str> = v["entries"].as_array().unwrap().iter().map(|e| e["amount"].as_str().unwrap()).collect();
    assert_eq!(amounts, ["20.00", "5.00"]);
    assert_eq!(v["closing_balance"], "75.00");
    // The closing balance is the fold of the log up to `to`.
    let (_, at_to) = t.get(&format!("/v1/accounts/{a}?as_of={}", q(to)), &ann).await;
    assert_eq!(at_to["balance"], v["closing_balance"]);
    let (s, _) = t.get(&format!("/v1/accounts/{a}/statement?from={}&to={}", q(to), q(from)), &ann).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, eve) = t.user().await;
    let (s, _) = t.get(&format!("/v1/accounts/{a}/statement"), &eve).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    t.cleanup().await;
}
