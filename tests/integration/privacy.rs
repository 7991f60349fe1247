//! Crypto-shredding: personal fields are sealed per user in the log; forgetting
//! a user destroys the key, after which exports and read models show
//! "[erased]" while amounts, the chain and verification still hold.

use crate::harness::{TestLedger, PASSWORD};
use ledger_audit::export::{self, Filter, Format};
use ledger_domain::events::Role;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn export_lines(t: &TestLedger, filter: Filter) -> (Vec<Value>, String) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let pool = t.pool.clone();
    let ledger = ledger::ledger_for(&t.config, pool.clone());
    let task = tokio::spawn(async move { export::export(&pool, &filter, Format::Jsonl, tx, Some(&ledger)).await });
    let mut text = String::new();
    while let Some(line) = rx.recv().await {
        text.push_str(&line);
    }
    let summary = task.await.unwrap().unwrap();
    ledger_audit::verify::verify(std::io::Cursor::new(text.as_bytes())).expect("the export verifies");
    (text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(), summary.final_hash)
}

#[tokio::test]
async fn forgetting_a_user_erases_their_personal_data_but_not_the_money_or_the_chain() {
    let t = TestLedger::start().await;
    let admin = t.person_with_role(Role::Admin).await;
    let email = format!("ann-{}@example.com", uuid::Uuid::new_v4().simple());
    let (s, v, _) = t
        .request(
            Method::POST,
            "/v1/auth/register",
            None,
            None,
            Some(json!({"email": email, "password": PASSWORD, "display_name": "Ann Example"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let ann_id = v["user_id"].as_str().unwrap().to_owned();
    let (s, _) = t.login(&email, "not her password", json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (_, login) = t.login(&email, PASSWORD, json!({})).await;
    let ann = login["access_token"].as_str().unwrap().to_owned();
    let a = t.account(&ann, "USD").await;
    t.deposit(&ann, &a, "25.00").await;
    t.settle().await;

    // Sealed in the log: neither the address nor the name is there in the clear.
    let log: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events").fetch_all(&t.pool).await.unwrap();
    assert!(log.iter().all(|p| !p.contains(&email) && !p.contains("Ann Example")), "personal data in the clear");
    // Readers with the key see it.
    let (_, activity) = t.get(&format!("/v1/me/activity?min_position={}", t.head().await), &ann).await;
    let registered =
        activity["items"].as_array().unwrap().iter().find(|i| i["event_type"] == "UserRegistered").unwrap();
    assert_eq!(registered["detail"]["email"], email.as_str());
    let only_registrations =
        Filter { user: ann_id.parse().ok(), types: vec!["UserRegistered".into()], ..Default::default() };
    let (before, hash_before) = export_lines(&t, only_registrations.clone()).await;
    assert_eq!(before[0]["personal"]["email"], email.as_str());
    assert_eq!(before[0]["personal"]["display_name"], "Ann Example");

    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/users/{ann_id}/forget"),
            Some(&admin.token),
            Some("forget-ann"),
            Some(json!({"reason": "erasure request"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let (after, hash_after) = export_lines(&t, only_registrations).await;
    assert_eq!(after[0]["personal"]["email"], "[erased]");
    assert_eq!(after[0]["personal"]["display_name"], "[erased]");
    assert_eq!(hash_after, hash_before, "the chain covers the ciphertext, which did not change");
    let (everything, _) = export_lines(&t, Filter { user: ann_id.parse().ok(), ..Default::default() }).await;
    let failed = everything.iter().find(|l| l["event"]["event_type"] == "LoginFailed").unwrap();
    assert_eq!(failed["personal"]["email"], "[erased]");
    assert!(!serde_json::to_string(&everything).unwrap().contains(&email));

    // The money is untouched; the person cannot log in; the key is gone.
    let (s, v) = t.get(&format!("/v1/accounts/{a}"), &admin.token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["balance"], "25.00");
    let (s, _) = t.login(&email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM personal_data_keys WHERE user_id = $1::uuid")
        .bind(&ann_id)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(keys, 0);
    let (s, v) = t.get(&format!("/v1/admin/users/{ann_id}"), &admin.token).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!v["email"].as_str().unwrap().contains("ann-"), "{v}");
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/users/{ann_id}/forget"),
            Some(&admin.token),
            Some("forget-again"),
            Some(json!({"reason": "again"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    t.assert_invariants().await;
    t.cleanup().await;
}
