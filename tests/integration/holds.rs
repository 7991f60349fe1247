//! Holds through the public API, including each failure the anchors' bug
//! trackers record: double release, capture after expiry, capture of a hold
//! that failed, holds not counted against the balance, races to resolve.

use crate::harness::{FundedPair, TestLedger};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

fn code(v: &Value) -> &str {
    v["type"].as_str().and_then(|t| t.rsplit('/').next()).unwrap_or("")
}

#[tokio::test]
async fn a_hold_reserves_available_and_a_partial_capture_releases_the_rest() {
    a_hold_and_a_partial_capture(2).await;
}

/// The same with every command in its own transaction (no group commit).
#[tokio::test]
async fn a_hold_alone_reserves_available_and_a_partial_capture_alone_releases_the_rest() {
    a_hold_and_a_partial_capture(0).await;
}

async fn a_hold_and_a_partial_capture(writers: usize) {
    let t = TestLedger::start_with(|c| c.group_commit_writers = writers).await;
    let FundedPair { payer: ann, payer_account: a, payee: shop, payee_account: s } =
        t.funded_pair("USD", "100.00").await;

    let (st, hold) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "60.00"})).await;
    assert_eq!(st, StatusCode::CREATED, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap().to_owned();
    assert!(hold["expires_at"].is_string() && hold["position"].is_i64());
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", hold["position"]), &ann).await;
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some("100.00"), Some("40.00")));

    // Not counted against the balance would let these through; they must not pass.
    let (st, v) = t.post(&format!("/v1/accounts/{a}/withdrawals"), &ann, json!({"amount": "40.01"})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"), "{v}");
    let (st, v) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "40.01"})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"), "{v}");

    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/capture"), &shop, json!({"amount": "60.01"})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "captured <= held: {v}");
    let (st, cap) = t.post(&format!("/v1/holds/{hold_id}/capture"), &shop, json!({"amount": "25.00"})).await;
    assert_eq!(st, StatusCode::CREATED, "{cap}");
    assert_eq!((cap["amount"].as_str(), cap["released"].as_str()), (Some("25.00"), Some("35.00")));
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/capture"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending"), "captured once: {v}");
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/release"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending"), "{v}");

    let position = cap["position"].as_i64().unwrap();
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={position}"), &ann).await;
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some("75.00"), Some("75.00")));
    let (_, h) = t.get(&format!("/v1/holds/{hold_id}"), &shop).await;
    assert_eq!((h["status"].as_str(), h["captured_amount"].as_str()), (Some("captured"), Some("25.00")), "{h}");
    let (_, statement) = t.get(&format!("/v1/accounts/{s}/transactions"), &shop).await;
    assert_eq!(statement["items"][0]["kind"], "hold_capture");
    assert_eq!(statement["items"][0]["amount"], "25.00");

    // Third parties see nothing.
    let (_, eve) = t.user().await;
    let (st, v) = t.get(&format!("/v1/holds/{hold_id}"), &eve).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "hold-not-found"));
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_double_release_and_a_capture_of_a_failed_hold_are_refused() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: shop, payee_account: s } =
        t.funded_pair("EUR", "10.00").await;
    let (_, hold) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "10.00"})).await;
    let hold_id = hold["hold_id"].as_str().unwrap().to_owned();
    // The payer cannot take back a hold: it guarantees the payee until expiry.
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/release"), &ann, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (st, _) = t.post(&format!("/v1/holds/{hold_id}/release"), &shop, json!({})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/release"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending"), "{v}");

    // A hold refused for funds leaves nothing to capture.
    let (st, refused) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "50.00"})).await;
    assert_eq!((st, code(&refused)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"));
    assert!(refused.get("hold_id").is_none());
    let ghost = uuid::Uuid::new_v4();
    let (st, v) = t.post(&format!("/v1/holds/{ghost}/capture"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::NOT_FOUND, "hold-not-found"), "{v}");

    let head = t.head().await;
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    assert_eq!(view["available"], "10.00");
    let (_, pending) = t.get(&format!("/v1/accounts/{a}/holds?status=pending"), &ann).await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 0);
    let (_, released) = t.get(&format!("/v1/accounts/{a}/holds?status=released"), &ann).await;
    assert_eq!(released["items"].as_array().unwrap().len(), 1);
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn an_expired_hold_cannot_be_captured_or_released() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: shop, payee_account: s } =
        t.funded_pair("USD", "10.00").await;
    let (st, hold) = t
        .post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "4.00", "expires_in_seconds": 1}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{hold}");
    let hold_id = hold["hold_id"].as_str().unwrap().to_owned();
    let (st, v) = t
        .post(
            "/v1/holds",
            &ann,
            json!({"from_account": a, "to_account": s, "amount": "1", "expires_in_seconds": 2_592_001}),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "at most 30 days: {v}");

    // The scheduler expires it on its own.
    let mut status = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.settle().await;
        let (_, h) = t.get(&format!("/v1/holds/{hold_id}"), &ann).await;
        status = h["status"].as_str().unwrap_or_default().to_owned();
        if status == "expired" {
            break;
        }
    }
    assert_eq!(status, "expired");
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/capture"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending"), "{v}");
    let (st, v) = t.post(&format!("/v1/holds/{hold_id}/release"), &shop, json!({})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending"), "{v}");
    let expiries: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldExpired'")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(expiries, 1, "expired once, however many sweeps ran");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Grouped (the default), the racing commands are decided in order on one
/// state; alone, each in its own transaction under the payer's lock.
#[tokio::test]
async fn captures_and_releases_racing_on_one_hold_resolve_it_exactly_once() {
    captures_and_releases_racing_on_one_hold(2).await;
}

#[tokio::test]
async fn captures_and_releases_racing_on_one_hold_alone_resolve_it_exactly_once() {
    captures_and_releases_racing_on_one_hold(0).await;
}

async fn captures_and_releases_racing_on_one_hold(writers: usize) {
    let t = TestLedger::start_with(|c| c.group_commit_writers = writers).await;
    let FundedPair { payer: ann, payer_account: a, payee: shop, payee_account: s } =
        t.funded_pair("USD", "50.00").await;
    let (_, hold) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "50.00"})).await;
    let hold_id = hold["hold_id"].as_str().unwrap().to_owned();
    let capture = format!("/v1/holds/{hold_id}/capture");
    let release = format!("/v1/holds/{hold_id}/release");
    let mut calls = vec![];
    for i in 0..20 {
        if i % 2 == 0 {
            calls.push(t.post(&capture, &shop, json!({})));
        } else {
            calls.push(t.post(&release, &shop, json!({})));
        }
    }
    let answers = futures::future::join_all(calls).await;
    let won = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    assert_eq!(won, 1, "{answers:?}");
    assert!(answers.iter().all(|(s, v)| *s == StatusCode::CREATED || code(v) == "hold-not-pending"));
    let resolutions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('HoldCaptured', 'HoldReleased', 'HoldExpired')",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(resolutions, 1);
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn fees_are_charged_with_the_transfer_as_their_own_entry() {
    let t = TestLedger::start_with(|c| {
        c.fees = ledger_domain::fees::FeeSchedule::parse("transfer:0.5%:0.10").unwrap();
    })
    .await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("USD", "100.00").await;
    let (st, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "25.50"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["fee"]["amount"], "0.13", "0.5% of 25.50 = 0.1275, to minor units: {v}");
    let (st, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "5.00"})).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v["fee"]["amount"], "0.10", "the minimum");
    // 100 - 25.50 - 0.13 - 5.00 - 0.10 = 69.27: 69.27 would leave nothing for the fee.
    let (st, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "69.27"})).await;
    assert_eq!((st, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"), "the fee counts: {v}");
    let (_, v) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(v["balance"], "69.27");
    let (_, statement) = t.get(&format!("/v1/accounts/{a}/transactions"), &ann).await;
    let kinds: Vec<&str> = statement["items"].as_array().unwrap().iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["fee", "transfer", "fee", "transfer", "deposit"]);
    // Deposits pay no fee.
    let (_, dep) = t.post(&format!("/v1/accounts/{a}/deposits"), &ann, json!({"amount": "1.00"})).await;
    assert!(dep.get("fee").is_none());
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_repeated_hold_request_with_one_key_reserves_once() {
    a_repeated_hold_request_with_one_key(2).await;
}

#[tokio::test]
async fn a_repeated_hold_request_with_one_key_alone_reserves_once() {
    a_repeated_hold_request_with_one_key(0).await;
}

async fn a_repeated_hold_request_with_one_key(writers: usize) {
    let t = TestLedger::start_with(|c| c.group_commit_writers = writers).await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: s } = t.funded_pair("USD", "10.00").await;
    let body = json!({"from_account": a, "to_account": s, "amount": "6.00"});
    let (s1, v1, _) = t.request(Method::POST, "/v1/holds", Some(&ann), Some("hold-once"), Some(body.clone())).await;
    let (s2, v2, h2) = t.request(Method::POST, "/v1/holds", Some(&ann), Some("hold-once"), Some(body)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(v1, v2);
    assert_eq!(h2["idempotent-replayed"], "true");
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["available"], "4.00");
    t.cleanup().await;
}

/// The `balances` projector applies runs of movements and hold events set-based;
/// the rows must be those one-event-at-a-time application writes, with every
/// kind of hold event and holds placed and resolved within one batch.
#[tokio::test]
async fn set_based_balances_equal_event_by_event_application() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, shop) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let b = t.account(&ann, "USD").await;
    let s = t.account(&shop, "USD").await;
    t.deposit(&ann, &a, "100.00").await;
    let hold = |from: &str, amount: &str, expires: u64| json!({"from_account": from, "to_account": s, "amount": amount, "expires_in_seconds": expires});
    let mut holds = vec![];
    for (amount, expires) in [("10.00", 3600), ("20.00", 3600), ("5.50", 1), ("7.25", 3600)] {
        let (st, h) = t.post("/v1/holds", &ann, hold(&a, amount, expires)).await;
        assert_eq!(st, StatusCode::CREATED, "{h}");
        holds.push(h["hold_id"].as_str().unwrap().to_owned());
    }
    let (st, v) = t.post(&format!("/v1/holds/{}/capture", holds[0]), &shop, json!({"amount": "4.00"})).await;
    assert!(st.is_success(), "{v}");
    let (st, v) = t.post(&format!("/v1/holds/{}/release", holds[1]), &shop, json!({})).await;
    assert!(st.is_success(), "{v}");
    let (st, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "1.10"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = t.post(&format!("/v1/holds/{}/capture", holds[3]), &shop, json!({})).await;
    assert!(st.is_success(), "{v}");
    // The third expires on the scheduler's sweep.
    let mut expired = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, h) = t.get(&format!("/v1/holds/{}", holds[2]), &ann).await;
        if h["status"] == "expired" {
            expired = true;
            break;
        }
    }
    assert!(expired, "the scheduler expired the third hold");
    t.settle().await;

    let log = t.log().await;
    let kinds: std::collections::BTreeSet<&str> = log.iter().map(|e| e.event_type.as_str()).collect();
    for kind in ["HoldPlaced", "HoldCaptured", "HoldReleased", "HoldExpired", "TransferRecorded"] {
        assert!(kinds.contains(kind), "the log has a {kind}");
    }
    // Copies of the tables: one event at a time, the whole log as one batch
    // (holds placed and resolved in one run), and batches of three (holds
    // resolved in a later batch than their placement, beside movements).
    let balances = ledger_projections::Projection::Balances;
    let mut conn = t.pool.acquire().await.unwrap();
    for (schema, batch) in [("by_event", 1), ("as_batch", log.len()), ("in_threes", 3)] {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *conn).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut *conn).await.unwrap();
        for table in ["balances", "holds"] {
            sqlx::query(&format!("CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"))
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
        sqlx::query(&format!("SET LOCAL search_path TO {schema}, public")).execute(&mut *tx).await.unwrap();
        if batch == 1 {
            for event in &log {
                balances.apply(&mut tx, event).await.unwrap();
            }
        } else {
            for events in log.chunks(batch) {
                balances.apply_all(&mut tx, events).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
    for (table, order) in [("balances", "account_id"), ("holds", "hold_id")] {
        let dump = |schema: &str| format!("SELECT row_to_json(r)::text FROM {schema}.{table} r ORDER BY {order}");
        let by_event: Vec<String> = sqlx::query_scalar(&dump("by_event")).fetch_all(&mut *conn).await.unwrap();
        let as_batch: Vec<String> = sqlx::query_scalar(&dump("as_batch")).fetch_all(&mut *conn).await.unwrap();
        let in_threes: Vec<String> = sqlx::query_scalar(&dump("in_threes")).fetch_all(&mut *conn).await.unwrap();
        let live: Vec<String> = sqlx::query_scalar(&dump("public")).fetch_all(&mut *conn).await.unwrap();
        assert!(!by_event.is_empty());
        assert_eq!(as_batch, by_event, "{table}: one batch writes what event by event writes");
        assert_eq!(in_threes, by_event, "{table}: so do batches of three");
        assert_eq!(live, by_event, "{table}: so does the live projector");
    }
    for schema in ["by_event", "as_batch", "in_threes"] {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    t.assert_invariants().await;
    t.cleanup().await;
}
