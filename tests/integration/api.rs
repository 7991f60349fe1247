use crate::harness::TestLedger;
use reqwest::{Method, StatusCode};
use serde_json::json;

fn code(v: &serde_json::Value) -> &str {
    v["type"].as_str().and_then(|t| t.rsplit('/').next()).unwrap_or("")
}

#[tokio::test]
async fn register_login_and_auth_errors() {
    let t = TestLedger::start().await;
    let email = format!("{}@Example.com", uuid::Uuid::new_v4().simple());
    let register = |body| t.request(Method::POST, "/v1/auth/register", None, None, Some(body));
    let (s, v, h) = register(json!({"email": email, "password": "correct horse", "display_name": "Ann"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["user_id"].is_string());
    assert_eq!(h["content-type"], "application/json");
    let (s, v, h) = register(json!({"email": email.to_uppercase(), "password": "correct horse"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "email-taken"));
    assert_eq!(h["content-type"], "application/problem+json");
    for (k, s) in ["title", "detail", "status", "type"].iter().zip([0; 4]) {
        let _ = s;
        assert!(!v[k].is_null(), "problem has {k}");
    }
    let (s, v, _) = register(json!({"email": "not-an-email", "password": "correct horse"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));
    assert!(v["detail"].as_str().unwrap().contains("email"));
    let (s, v, _) = register(json!({"email": "short@example.com", "password": "123456789"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));
    assert!(v["detail"].as_str().unwrap().contains("password"));

    let login = |body| t.request(Method::POST, "/v1/auth/login", None, None, Some(body));
    let (s, v, _) = login(json!({"email": email, "password": "correct horse"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 900);
    let (s, v, _) = login(json!({"email": email, "password": "wrong horse!"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"));
    let (s, v, _) = login(json!({"email": "nobody@example.com", "password": "wrong horse!"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"));
    // No password hash ever reaches the log.
    let log = serde_json::to_string(&t.log().await).unwrap();
    assert!(!log.contains("argon2") && !log.contains("correct horse"));

    for token in [None, Some("garbage"), Some("eyJhbGciOiJIUzI1NiJ9.e30.x")] {
        let (s, v, _) = t.request(Method::GET, "/v1/accounts", token, None, None).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{token:?}");
    }
    t.cleanup().await;
}

#[tokio::test]
async fn accounts_deposits_withdrawals_transfers_and_reads() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let (s, v) = t.post("/v1/accounts", &ann, json!({"currency": "USD", "name": "Main"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!((v["currency"].as_str(), v["name"].as_str()), (Some("USD"), Some("Main")));
    assert!(v["position"].as_i64().unwrap() > 0);
    let a = v["account_id"].as_str().unwrap().to_owned();
    let b = t.account(&bob, "USD").await;
    let e = t.account(&bob, "EUR").await;
    let (s, v) = t.post("/v1/accounts", &ann, json!({"currency": "XYZ"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));

    let p = t.deposit(&ann, &a, "100.00").await;
    assert_eq!(t.balance(&ann, &a, p).await, "100.00");
    // Bob cannot see, deposit into or debit Ann's account.
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position={p}"), &bob).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "account-not-found"));
    let (s, v) = t.post(&format!("/v1/accounts/{a}/withdrawals"), &bob, json!({"amount": "1"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "account-not-found"));
    let (s, v) = t.post("/v1/transfers", &bob, json!({"from_account": a, "to_account": b, "amount": "1"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "account-not-found"));

    let (s, v) = t
        .post(
            "/v1/transfers",
            &ann,
            json!({"from_account": a, "to_account": b, "amount": "30.25", "reference": "rent"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let transfer = v["transfer_id"].as_str().unwrap().to_owned();
    let p = v["position"].as_i64().unwrap();
    assert_eq!(t.balance(&ann, &a, p).await, "69.75");
    assert_eq!(t.balance(&bob, &b, p).await, "30.25");
    for who in [&ann, &bob] {
        let (s, v) = t.get(&format!("/v1/transfers/{transfer}?min_position={p}"), who).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            (v["amount"].as_str(), v["currency"].as_str(), v["kind"].as_str(), v["reference"].as_str()),
            (Some("30.25"), Some("USD"), Some("transfer"), Some("rent"))
        );
    }
    let (_, carol) = t.user().await;
    let (s, v) = t.get(&format!("/v1/transfers/{transfer}"), &carol).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "transfer-not-found"));

    let rejections = [
        (
            json!({"from_account": a, "to_account": b, "amount": "69.76"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient-funds",
        ),
        (
            json!({"from_account": a, "to_account": e, "amount": "1"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency-mismatch",
        ),
        (json!({"from_account": a, "to_account": a, "amount": "1"}), StatusCode::UNPROCESSABLE_ENTITY, "same-account"),
        (
            json!({"from_account": a, "to_account": uuid::Uuid::new_v4(), "amount": "1"}),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
    ];
    for (body, status, problem) in rejections {
        let (s, v) = t.post("/v1/transfers", &ann, body.clone()).await;
        assert_eq!((s, code(&v)), (status, problem), "{body} -> {v}");
    }
    let (s, v) = t.post(&format!("/v1/accounts/{a}/withdrawals"), &ann, json!({"amount": "69.75"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let p = v["position"].as_i64().unwrap();
    assert_eq!(t.balance(&ann, &a, p).await, "0.00");
    let (s, v) = t.post(&format!("/v1/accounts/{a}/withdrawals"), &ann, json!({"amount": "0.01"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"));

    // The statement, newest first, with running balances, paged.
    let (s, v) = t.get(&format!("/v1/accounts/{a}/transactions?limit=2&min_position={p}"), &ann).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0]["kind"].as_str(), items[0]["direction"].as_str(), items[0]["balance_after"].as_str()),
        (Some("withdrawal"), Some("debit"), Some("0.00"))
    );
    assert_eq!(
        (items[1]["kind"].as_str(), items[1]["amount"].as_str(), items[1]["balance_after"].as_str()),
        (Some("transfer"), Some("30.25"), Some("69.75"))
    );
    assert_eq!(items[1]["counterparty_account"].as_str(), Some(b.as_str()));
    let cursor = v["next_cursor"].as_str().unwrap();
    let (_, v) = t.get(&format!("/v1/accounts/{a}/transactions?limit=2&cursor={cursor}"), &ann).await;
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!((items[0]["kind"].as_str(), items[0]["balance_after"].as_str()), (Some("deposit"), Some("100.00")));
    assert!(v["next_cursor"].is_null());
    let (s, v) = t.get(&format!("/v1/accounts/{a}/transactions?limit=0"), &ann).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));

    let (s, v) = t.get(&format!("/v1/accounts?min_position={p}"), &bob).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn bad_input_gets_problem_json_and_writes_nothing() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let jpy = t.account(&ann, "JPY").await;
    let head = t.head().await;
    let deposit = format!("/v1/accounts/{a}/deposits");
    for bad in [
        json!("0"),
        json!("-1"),
        json!("1e3"),
        json!("1.001"),
        json!("abc"),
        json!(""),
        json!(12.5),
        json!(null),
        json!("1000000000000"),
        json!(" 1"),
    ] {
        let (s, v) = t.post(&deposit, &ann, json!({"amount": bad})).await;
        assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{bad} -> {v}");
        assert!(v["detail"].as_str().unwrap().contains("amount"), "{v}");
    }
    let (s, v) = t.post(&format!("/v1/accounts/{jpy}/deposits"), &ann, json!({"amount": "1.5"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t.post(&deposit, &ann, json!({"amount": "1", "surprise": true})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t.post(&deposit, &ann, json!([1, 2])).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t.post("/v1/transfers", &ann, json!({"from_account": "nope", "to_account": a, "amount": "1"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("from_account"));

    let raw = |body: Vec<u8>, content_type: &'static str| {
        t.http
            .post(format!("{}{}", t.base, deposit))
            .bearer_auth(&ann)
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = raw(b"{\"amount\": ".to_vec(), "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r =
        raw(format!("{{\"amount\":\"1\",\"reference\":\"{}\"}}", "x".repeat(70_000)).into_bytes(), "application/json")
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = raw(b"amount=1".to_vec(), "application/x-www-form-urlencoded").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (s, v, h) = t.request(Method::GET, "/v1/nowhere", Some(&ann), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not-found"));
    assert_eq!(h["content-type"], "application/problem+json");
    let (s, v, _) = t.request(Method::DELETE, "/v1/transfers", Some(&ann), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"));
    let (s, v) = t.get("/v1/accounts/not-a-uuid", &ann).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "account-not-found"));
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position=abc"), &ann).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));
    // Given twice, it must not silently skip the wait.
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position=999999&min_position=999999"), &ann).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    // A path segment that is not UTF-8 still gets problem+json.
    let (s, v, h) = t.request(Method::GET, "/v1/accounts/%FF", Some(&ann), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not-found"), "{v}");
    assert_eq!(h["content-type"], "application/problem+json");

    // A malformed amount is recorded under its key like any rejection.
    let (s, v, _) =
        t.request(Method::POST, &deposit, Some(&ann), Some("zero-amount"), Some(json!({"amount": "0"}))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"));
    let (s, recorded) = t.get("/v1/commands/zero-amount", &ann).await;
    assert_eq!(s, StatusCode::OK, "{recorded}");
    assert_eq!(recorded["status"], 422);
    assert_eq!(recorded["response"], v);

    assert_eq!(t.head().await, head, "no rejected request wrote an event");
    t.cleanup().await;
}

#[tokio::test]
async fn read_your_writes_times_out_with_projection_lag() {
    let t = TestLedger::start_with(|c| c.read_wait = std::time::Duration::from_millis(300)).await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position=999999"), &ann).await;
    assert_eq!((s, code(&v)), (StatusCode::GATEWAY_TIMEOUT, "projection-lag"));
    let (s, _, _) = t.request(Method::GET, "/healthz", None, None, None).await;
    assert_eq!(s, StatusCode::OK);
    t.settle().await;
    let (s, v, _) = t.request(Method::GET, "/readyz", None, None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["projections"]["balances"]["lag_events"], 0);
    let (s, v, _) = t.request(Method::GET, "/openapi.json", None, None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["paths"]["/v1/transfers"].is_object());
    assert!(v["paths"]["/v1/admin/users/{id}/block"].is_object());
    let schemes = &v["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
    assert_eq!(schemes["cookie"]["in"], "cookie", "{schemes}");
    assert_eq!(schemes["cookie"]["name"], "ledger_access", "{schemes}");
    let (s, _, _) = t.request(Method::GET, "/docs/", None, None, None).await;
    assert_eq!(s, StatusCode::OK);
    t.cleanup().await;
}
