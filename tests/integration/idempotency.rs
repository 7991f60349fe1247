use crate::harness::{FundedPair, TestLedger};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn same_key_same_request_replays_the_first_answer() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let path = format!("/v1/accounts/{a}/deposits");
    let body = json!({"amount": "10.00", "reference": "salary"});
    let (s1, v1, h1) = t.request(Method::POST, &path, Some(&ann), Some("dep-1"), Some(body.clone())).await;
    assert_eq!(s1, StatusCode::CREATED);
    assert!(h1.get("idempotent-replayed").is_none());
    // The same request with its keys in another order is the same request.
    let reordered = json!({"reference": "salary", "amount": "10.00"});
    let (s2, v2, h2) = t.request(Method::POST, &path, Some(&ann), Some("dep-1"), Some(reordered)).await;
    assert_eq!((s2, &v2), (s1, &v1));
    assert_eq!(h2["idempotent-replayed"], "true");
    let p = v1["position"].as_i64().unwrap();
    assert_eq!(t.balance(&ann, &a, p).await, "10.00", "one effect");

    // Same key, another request.
    let (s, v, _) = t.request(Method::POST, &path, Some(&ann), Some("dep-1"), Some(json!({"amount": "11.00"}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["type"], "/problems/idempotency-key-reuse");

    // Domain rejections are recorded too, and replayed even after the state changed.
    let w = format!("/v1/accounts/{a}/withdrawals");
    let (s, v, _) = t.request(Method::POST, &w, Some(&ann), Some("wd-1"), Some(json!({"amount": "50.00"}))).await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/insufficient-funds")));
    t.deposit(&ann, &a, "100.00").await;
    let (s2, v2, h) = t.request(Method::POST, &w, Some(&ann), Some("wd-1"), Some(json!({"amount": "50.00"}))).await;
    assert_eq!((s2, v2), (s, v));
    assert_eq!(h["idempotent-replayed"], "true");

    // A lost answer can be settled by key; unknown keys are 404; keys are per user.
    let (s, v) = t.get("/v1/commands/dep-1", &ann).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["status"].as_u64(), &v["response"]), (Some(201), &v1));
    let (s, v) = t.get("/v1/commands/never-sent", &ann).await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::NOT_FOUND, Some("/problems/command-not-found")));
    let (_, bob) = t.user().await;
    let (s, _) = t.get("/v1/commands/dep-1", &bob).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let b = t.account(&bob, "USD").await;
    let (s, _, h) = t
        .request(
            Method::POST,
            &format!("/v1/accounts/{b}/deposits"),
            Some(&bob),
            Some("dep-1"),
            Some(json!({"amount": "1.00"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(h.get("idempotent-replayed").is_none());

    // Every POST but register and login needs a key.
    let (s, v, _) = t.request(Method::POST, &path, Some(&ann), None, Some(json!({"amount": "1"}))).await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::BAD_REQUEST, Some("/problems/idempotency-key-required")));
    let (s, _, _) = t.request(Method::POST, "/v1/accounts", Some(&ann), None, Some(json!({"currency": "USD"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn ten_concurrent_requests_with_one_key_have_one_effect_and_one_answer() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } =
        t.funded_pair("USD", "100.00").await;
    let body = json!({"from_account": a, "to_account": b, "amount": "7.00"});
    let answers = futures::future::join_all(
        (0..10).map(|_| t.request(Method::POST, "/v1/transfers", Some(&ann), Some("pay-bob"), Some(body.clone()))),
    )
    .await;
    let first = (answers[0].0, answers[0].1.clone());
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    for (s, v, _) in &answers {
        assert_eq!((*s, v), (first.0, &first.1), "ten identical answers");
    }
    let replayed = answers.iter().filter(|(_, _, h)| h.get("idempotent-replayed").is_some()).count();
    assert_eq!(replayed, 9, "one original, nine replays");
    let p = first.1["position"].as_i64().unwrap();
    assert_eq!(t.balance(&ann, &a, p).await, "93.00");
    assert_eq!(t.balance(&bob, &b, p).await, "7.00");
    let transfers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'TransferRecorded' AND payload->>'kind' = 'transfer'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(transfers, 1);
    t.assert_invariants().await;
    t.cleanup().await;
}
