//! `POST /v1/transfers/batch`: all or none, or each on its own; item keys
//! and the request key both keep it exactly-once.

use crate::harness::{FundedPair, TestLedger};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

fn code(v: &Value) -> &str {
    v["type"].as_str().and_then(|t| t.rsplit('/').next()).unwrap_or("")
}

#[tokio::test]
async fn an_atomic_batch_moves_all_or_nothing_and_each_item_once() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("USD", "100.00").await;
    let item = |key: &str, amount: &str| json!({"key": key, "from_account": a, "to_account": b, "amount": amount});
    // The third item would overdraw once the first two are counted: nothing moves.
    let body = json!({"atomic": true, "transfers": [item("i1", "40.00"), item("i2", "40.00"), item("i3", "40.00")]});
    let (s, v, _) = t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("batch-1"), Some(body)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"), "{v}");
    assert_eq!(v["item"], 2, "{v}");
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["balance"], "100.00");

    let body = json!({"atomic": true, "transfers": [item("j1", "40.00"), item("j2", "35.50")]});
    let (s1, v1, _) =
        t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("batch-2"), Some(body.clone())).await;
    assert_eq!(s1, StatusCode::CREATED, "{v1}");
    let (s2, v2, h2) = t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("batch-2"), Some(body)).await;
    assert_eq!((s2, &v2), (StatusCode::CREATED, &v1), "the request key replays");
    assert_eq!(h2["idempotent-replayed"], "true");
    // An item key is a transfer's key: the same transfer sent alone replays it.
    let (s, single, _) = t
        .request(
            Method::POST,
            "/v1/transfers",
            Some(&ann),
            Some("j1"),
            Some(json!({"from_account": a, "to_account": b, "amount": "40.00"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(single["transfer_id"], v1["results"][0]["body"]["transfer_id"]);
    // A new batch repeating an old item moves only the new one.
    let body = json!({"atomic": true, "transfers": [item("j2", "35.50"), item("j3", "4.50")]});
    let (s, v, _) = t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("batch-3"), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["results"][0]["replayed"], true);
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["balance"], "20.00", "100 - 40 - 35.50 - 4.50");
    // A key whose transfer was refused cannot slip into a batch that succeeds.
    let (s, _, _) = t
        .request(
            Method::POST,
            "/v1/transfers",
            Some(&ann),
            Some("too-much"),
            Some(json!({"from_account": a, "to_account": b, "amount": "999.00"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let body = json!({"atomic": true, "transfers": [item("k-new", "1.00"), item("too-much", "999.00")]});
    let (s, v, _) = t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("batch-4"), Some(body)).await;
    assert_eq!((s, code(&v), v["item"].as_i64()), (StatusCode::UNPROCESSABLE_ENTITY, "validation", Some(1)), "{v}");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// A bulk load cannot run ahead of what readers see: with a bound of one
/// event (`LEDGER_BULK_MAX_BACKLOG`), a batch goes only once the read side
/// has applied everything this instance wrote before it: batches, atomic or
/// not, and single transfers (group commit's writes count too).
#[tokio::test]
async fn a_batch_waits_until_the_read_side_has_applied_what_came_before_it() {
    // A relay that reads at most every 100 ms after a small read: without
    // the gate the next batch would answer long before this one is applied.
    // A long wait limit (the read side is given half of it before it counts
    // as stalled): a slow CI machine must not pass a batch as if stalled.
    let t = TestLedger::start_with(|c| {
        c.bulk_max_backlog = 1;
        c.bulk_max_wait = Duration::from_secs(60);
        c.relay_pace = Duration::from_millis(100);
    })
    .await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } =
        t.funded_pair("USD", "100.00").await;
    let mut last = 0;
    for n in 0..6 {
        let before = match n % 3 {
            // A single transfer first: group commit.
            0 => {
                let (s, v) =
                    t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "1.00"})).await;
                assert_eq!(s, StatusCode::CREATED, "{v}");
                v["position"].as_i64().expect("a position")
            }
            _ => t.head().await,
        };
        let item = |i: u32| json!({"key": format!("g{n}-{i}"), "from_account": a, "to_account": b, "amount": "1.00"});
        let body = json!({"atomic": n % 2 == 0, "transfers": [item(1), item(2)]});
        let (s, v, _) =
            t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some(&format!("gate-{n}")), Some(body)).await;
        assert!(s.is_success(), "{v}");
        // Checked now, without waiting: the batch went after it was applied.
        ledger_projections::read_side::wait_for(&t.pool, before, Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("batch {n} went before position {before} was applied: {e}"));
        last = v["position"].as_i64().expect("a position");
    }
    assert_eq!(t.balance(&bob, &b, last).await, "14.00", "2 single transfers and 6 batches of 2, 1.00 each");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_non_atomic_batch_answers_per_item() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let b = t.account(&bob, "EUR").await;
    let usd = t.account(&bob, "USD").await;
    t.deposit(&ann, &a, "50.00").await;
    let body = json!({"atomic": false, "transfers": [
        {"key": "k1", "from_account": a, "to_account": b, "amount": "30.00"},
        {"key": "k2", "from_account": a, "to_account": b, "amount": "30.00"},
        {"key": "k3", "from_account": a, "to_account": usd, "amount": "1.00"},
        {"key": "k4", "from_account": a, "to_account": b, "amount": "20.00"},
    ]});
    let (s, v, _) =
        t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("each-1"), Some(body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let statuses: Vec<i64> = v["results"].as_array().unwrap().iter().map(|r| r["status"].as_i64().unwrap()).collect();
    assert_eq!(statuses, [201, 422, 422, 201]);
    assert_eq!(code(&v["results"][1]["body"]), "insufficient-funds");
    assert_eq!(code(&v["results"][2]["body"]), "currency-mismatch");
    let (s, again, _) = t.request(Method::POST, "/v1/transfers/batch", Some(&ann), Some("each-1"), Some(body)).await;
    assert_eq!((s, &again), (StatusCode::OK, &v));
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["balance"], "0.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn batches_are_bounded_and_keys_checked() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let one = |key: String| json!({"key": key, "from_account": a, "to_account": a, "amount": "1.00"});
    let big: Vec<Value> = (0..1001).map(|i| one(format!("k{i}"))).collect();
    let (s, v) = t.post("/v1/transfers/batch", &ann, json!({"atomic": true, "transfers": big})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t.post("/v1/transfers/batch", &ann, json!({"atomic": true, "transfers": []})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t
        .post("/v1/transfers/batch", &ann, json!({"atomic": false, "transfers": [one("x".into()), one("x".into())]}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("transfers[1].key"));
    // An item under the request's own key is refused before anything runs
    // (it would wait on the batch's hold of that key), atomic or not.
    for atomic in [false, true] {
        let (s, v, _) = t
            .request(
                Method::POST,
                "/v1/transfers/batch",
                Some(&ann),
                Some("the-batch"),
                Some(json!({"atomic": atomic, "transfers": [one("other".into()), one("the-batch".into())]})),
            )
            .await;
        assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
        assert!(v["detail"].as_str().unwrap().contains("transfers[1].key"), "{v}");
    }
    t.cleanup().await;
}

/// A non-atomic batch holds its request key while its items run. A plain
/// transfer sent meanwhile under that same key waits for it, then is refused
/// as a reuse of the key; it must not hold up the batch's items (with one
/// group-commit writer, it used to hold the only writer until the 30 s limit).
#[tokio::test]
async fn a_transfer_reusing_a_running_batchs_key_waits_for_it_without_stalling_it() {
    let t = TestLedger::start_with(|c| c.group_commit_writers = 1).await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("USD", "1000.00").await;
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"key": format!("item-{i}"), "from_account": a, "to_account": b, "amount": "1.00"}))
        .collect();
    let batch = t.request(
        Method::POST,
        "/v1/transfers/batch",
        Some(&ann),
        Some("shared-key"),
        Some(json!({"atomic": false, "transfers": items})),
    );
    let single = async {
        // Once the batch's first item is recorded, the batch holds the key.
        t.wait_until_counted("SELECT count(*) FROM commands WHERE idempotency_key = 'item-0'").await;
        t.request(
            Method::POST,
            "/v1/transfers",
            Some(&ann),
            Some("shared-key"),
            Some(json!({"from_account": a, "to_account": b, "amount": "2.00"})),
        )
        .await
    };
    let ((bs, bv, _), (ss, sv, _)) = tokio::join!(batch, single);
    assert_eq!(bs, StatusCode::OK, "{bv}");
    assert!(bv["results"].as_array().unwrap().iter().all(|r| r["status"] == 201), "{bv}");
    assert_eq!((ss, code(&sv)), (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reuse"), "{sv}");
    t.assert_invariants().await;
    t.cleanup().await;
}
