//! Every endpoint against the owner, another user, support, admin and an
//! anonymous caller. All mismatches are reported at once.

use crate::harness::TestLedger;
use ledger_domain::events::Role;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

const CALLERS: [&str; 5] = ["owner", "other", "support", "admin", "anonymous"];

struct Row {
    method: Method,
    path: String,
    body: Option<Value>,
    /// Expected status per caller, in `CALLERS` order.
    expect: [u16; 5],
}

fn row(method: Method, path: impl Into<String>, body: Option<Value>, expect: [u16; 5]) -> Row {
    Row { method, path: path.into(), body, expect }
}

#[tokio::test]
async fn every_endpoint_checks_role_and_ownership() {
    let t = TestLedger::start().await;
    let owner = t.person().await;
    let other = t.person().await;
    let support = t.person_with_role(Role::Support).await;
    let admin = t.person_with_role(Role::Admin).await;
    let target = t.person().await;
    let account = t.account(&owner.token, "USD").await;
    let other_account = t.account(&other.token, "USD").await;
    t.deposit(&owner.token, &account, "500.00").await;
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/accounts/{account}/deposits"),
            Some(&owner.token),
            Some("owner-known-key"),
            Some(json!({"amount": "1.00"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let transfer = v["transfer_id"].as_str().unwrap().to_owned();
    let position = v["position"].as_i64().unwrap();
    t.settle().await;
    let tokens = [Some(&owner.token), Some(&other.token), Some(&support.token), Some(&admin.token), None];

    let money = json!({"amount": "1.00"});
    let rows = vec![
        // Reads of the owner's data: support and admin may, another user sees nothing.
        row(Method::GET, format!("/v1/accounts/{account}?min_position={position}"), None, [200, 404, 200, 200, 401]),
        row(Method::GET, format!("/v1/accounts/{account}/transactions"), None, [200, 404, 200, 200, 401]),
        row(Method::GET, format!("/v1/transfers/{transfer}"), None, [200, 404, 200, 200, 401]),
        row(Method::GET, format!("/v1/accounts?user_id={}", owner.id), None, [200, 403, 200, 200, 401]),
        row(Method::GET, "/v1/accounts", None, [200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/commands/owner-known-key", None, [200, 404, 404, 404, 401]),
        // Money out of the owner's account: only the owner, whatever the role.
        row(
            Method::POST,
            format!("/v1/accounts/{account}/withdrawals"),
            Some(money.clone()),
            [201, 404, 404, 404, 401],
        ),
        row(Method::POST, format!("/v1/accounts/{account}/deposits"), Some(money.clone()), [201, 404, 404, 404, 401]),
        row(
            Method::POST,
            "/v1/transfers",
            Some(json!({"from_account": account, "to_account": other_account, "amount": "1.00"})),
            [201, 404, 404, 404, 401],
        ),
        // Own things: each caller acts on their own.
        row(Method::POST, "/v1/accounts", Some(json!({"currency": "EUR"})), [201, 201, 201, 201, 401]),
        row(Method::GET, "/v1/auth/sessions", None, [200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/api-keys", None, [200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/me", None, [200, 200, 200, 200, 401]),
        row(Method::GET, "/v1/me/activity", None, [200, 200, 200, 200, 401]),
        // Staff reads.
        row(Method::GET, "/v1/admin/users?query=example", None, [403, 403, 200, 200, 401]),
        row(Method::GET, format!("/v1/admin/users/{}", owner.id), None, [403, 403, 200, 200, 401]),
        // Admin actions: admin only. Each admin call changes state, so the
        // pairs undo each other.
        row(
            Method::POST,
            format!("/v1/admin/users/{}/block", target.id),
            Some(json!({"reason": "r"})),
            [403, 403, 403, 200, 401],
        ),
        row(
            Method::POST,
            format!("/v1/admin/users/{}/unblock", target.id),
            Some(json!({"reason": "r"})),
            [403, 403, 403, 200, 401],
        ),
        row(
            Method::POST,
            format!("/v1/admin/users/{}/role", target.id),
            Some(json!({"role": "support"})),
            [403, 403, 403, 200, 401],
        ),
        row(
            Method::POST,
            format!("/v1/admin/accounts/{account}/freeze"),
            Some(json!({"reason": "r"})),
            [403, 403, 403, 200, 401],
        ),
        row(
            Method::POST,
            format!("/v1/admin/accounts/{account}/unfreeze"),
            Some(json!({"reason": "r"})),
            [403, 403, 403, 200, 401],
        ),
    ];

    let mut mismatches = vec![];
    for r in &rows {
        for (i, token) in tokens.iter().enumerate() {
            let key = (r.method == Method::POST).then(|| Uuid::new_v4().to_string());
            let (s, v, _) =
                t.request(r.method.clone(), &r.path, token.map(|s| s.as_str()), key.as_deref(), r.body.clone()).await;
            if s.as_u16() != r.expect[i] {
                mismatches.push(format!(
                    "{} {} as {}: expected {}, got {} {}",
                    r.method, r.path, CALLERS[i], r.expect[i], s, v
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    t.assert_invariants().await;
    t.cleanup().await;
}
