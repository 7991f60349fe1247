//! Identity and access: tokens, sessions, cookies, two-factor, API keys,
//! throttling, rate limits and admin actions, through the public API.

use crate::harness::{TestLedger, PASSWORD};
use data_encoding::BASE64URL_NOPAD;
use ledger_commands::identity::{CredentialCheck, Principal};
use ledger_commands::totp;
use ledger_domain::events::Role;
use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn code(v: &Value) -> &str {
    v["type"].as_str().and_then(|t| t.rsplit('/').next()).unwrap_or("")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    serde_json::from_slice(&BASE64URL_NOPAD.decode(payload.as_bytes()).expect("base64url")).expect("claims JSON")
}

fn unsigned_token(claims: &Value) -> String {
    let header = BASE64URL_NOPAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", BASE64URL_NOPAD.encode(claims.to_string().as_bytes()))
}

fn signed_token(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .expect("encode")
}

/// An admin blocks a user; the admin's answer.
async fn block(t: &TestLedger, admin_token: &str, user_id: &str) -> Value {
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/users/{user_id}/block"),
            Some(admin_token),
            Some(&format!("block-{user_id}")),
            Some(json!({"reason": "chargebacks"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

#[tokio::test]
async fn forged_expired_tampered_and_blocked_tokens_are_refused() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let bob = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let (s, _) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!(s, StatusCode::OK);

    let claims = claims_of(&ann.token);
    let mut expired = claims.clone();
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    // Tampered: Bob's id in Ann's signed token.
    let parts: Vec<&str> = ann.token.split('.').collect();
    let mut as_bob = claims.clone();
    as_bob["sub"] = json!(bob.id);
    let tampered = format!("{}.{}.{}", parts[0], BASE64URL_NOPAD.encode(as_bob.to_string().as_bytes()), parts[2]);
    for (what, token) in [
        ("alg none", unsigned_token(&claims)),
        ("wrong key", signed_token(&claims, b"some-other-secret-some-other-secret!!")),
        ("expired", signed_token(&expired, &t.config.jwt_secret)),
        ("tampered payload", tampered),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let (s, v) = t.get("/v1/accounts", &token).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{what}: {v}");
    }
    // A correctly signed token is still refused for a session that does not exist.
    let mut foreign_session = claims.clone();
    foreign_session["sid"] = json!(Uuid::new_v4());
    let (s, v) = t.get("/v1/accounts", &signed_token(&foreign_session, &t.config.jwt_secret)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");

    // A blocked user's still-valid token is refused from the next request on.
    let v = block(&t, &admin.token, &ann.id).await;
    assert_eq!(v["blocked"], true);
    let (s, v) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "user-blocked"), "{v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "user-blocked"), "{v}");
    let (s, v, _) =
        t.request(Method::POST, "/v1/auth/refresh", None, None, Some(json!({"refresh_token": ann.refresh}))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "blocking revoked the refresh token: {v}");
    // A wrong password is still just wrong credentials: a guesser learns nothing of the block.
    let (s, v) = t.login(&ann.email, "wrong password here", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"), "{v}");

    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/users/{}/unblock", ann.id),
            Some(&admin.token),
            Some("unblock-ann"),
            Some(json!({"reason": "resolved"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    t.cleanup().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_session() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let ledger = &t;
    let refresh = |token: String| async move {
        let (s, v, _) =
            ledger.request(Method::POST, "/v1/auth/refresh", None, None, Some(json!({"refresh_token": token}))).await;
        (s, v)
    };
    let (s, first) = refresh(ann.refresh.clone()).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["token_type"], "Bearer");
    let rotated = first["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, ann.refresh);
    assert!(rotated.len() >= 43, "at least 256 bits");
    let access = first["access_token"].as_str().unwrap().to_owned();
    let (s, _) = t.get("/v1/accounts", &access).await;
    assert_eq!(s, StatusCode::OK);

    // The old token again: reuse. The whole session ends, current token included.
    let (s, v) = refresh(ann.refresh.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "refresh-token-reused"), "{v}");
    let (s, v) = refresh(rotated).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the family is revoked: {v}");
    let (s, _) = t.get("/v1/accounts", &access).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "and so are its access tokens");
    let (s, _) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = refresh("made-up-token".into()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");
    let (s, v, _) = t.request(Method::POST, "/v1/auth/refresh", None, None, Some(json!({}))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");

    // The reuse is an event in the log.
    let reused: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'RefreshTokenReused'")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(reused, 1);
    t.cleanup().await;
}

fn set_cookies(headers: &HeaderMap) -> Vec<String> {
    headers.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}

fn cookie_value<'a>(cookies: &'a [String], name: &str) -> &'a str {
    cookies
        .iter()
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("{name} cookie set: {cookies:?}"))
}

#[tokio::test]
async fn browser_sessions_use_http_only_cookies_and_double_submit_csrf() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let response = t
        .http
        .post(format!("{}/v1/auth/login", t.base))
        .json(&json!({"email": ann.email, "password": PASSWORD, "cookies": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookies = set_cookies(response.headers());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Cookie");
    assert!(body.get("access_token").is_none() && body.get("refresh_token").is_none(), "no tokens in the body: {body}");
    let find = |name: &str| cookies.iter().find(|c| c.starts_with(&format!("{name}="))).unwrap().clone();
    let access = find("ledger_access");
    let refresh = find("ledger_refresh");
    let csrf_cookie = find("ledger_csrf");
    for c in [&access, &refresh] {
        assert!(c.contains("; HttpOnly"), "{c}");
        assert!(c.contains("; SameSite=Strict"), "{c}");
        assert!(c.contains("; Secure"), "{c}");
    }
    assert!(refresh.contains("; Path=/v1/auth;"), "{refresh}");
    assert!(access.contains("; Path=/;"), "{access}");
    assert!(!csrf_cookie.contains("HttpOnly"), "the page reads it: {csrf_cookie}");
    let csrf = cookie_value(&cookies, "ledger_csrf").to_owned();
    assert_eq!(body["csrf_token"], csrf.as_str());
    let jar = format!(
        "ledger_access={}; ledger_refresh={}; ledger_csrf={csrf}",
        cookie_value(&cookies, "ledger_access"),
        cookie_value(&cookies, "ledger_refresh")
    );

    let get = t.http.get(format!("{}/v1/accounts", t.base)).header("cookie", &jar).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK, "safe methods need no CSRF header");
    let post = |csrf_header: Option<&str>| {
        let mut req = t
            .http
            .post(format!("{}/v1/accounts", t.base))
            .header("cookie", &jar)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(&json!({"currency": "EUR"}));
        if let Some(h) = csrf_header {
            req = req.header("x-csrf-token", h);
        }
        req.send()
    };
    for (what, header) in [("missing", None), ("wrong", Some("not-the-token"))] {
        let r = post(header).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(code(&v), "csrf", "{what}: {v}");
    }
    let r = post(Some(&csrf)).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A transfer (whose session its write checks) needs the CSRF header too.
    let account: Value = r.json().await.unwrap();
    let transfer = |csrf_header: Option<&str>| {
        let mut req = t
            .http
            .post(format!("{}/v1/transfers", t.base))
            .header("cookie", &jar)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(&json!({"from_account": account["account_id"], "to_account": Uuid::new_v4(), "amount": "1.00"}));
        if let Some(h) = csrf_header {
            req = req.header("x-csrf-token", h);
        }
        req.send()
    };
    let r = transfer(None).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(code(&r.json::<Value>().await.unwrap()), "csrf");
    let r = transfer(Some(&csrf)).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "account-not-found", "past the door, refused by the write's decision: {v}");

    // Refresh by cookie also needs the CSRF header, and rotates the cookies.
    let refresh_by_cookie = |csrf_header: Option<String>| {
        let mut req = t.http.post(format!("{}/v1/auth/refresh", t.base)).header("cookie", &jar);
        if let Some(h) = csrf_header {
            req = req.header("x-csrf-token", h);
        }
        req.send()
    };
    assert_eq!(refresh_by_cookie(None).await.unwrap().status(), StatusCode::FORBIDDEN);
    let r = refresh_by_cookie(Some(csrf.clone())).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rotated = set_cookies(r.headers());
    assert_ne!(cookie_value(&rotated, "ledger_refresh"), cookie_value(&cookies, "ledger_refresh"));

    // Bearer tokens keep working without any CSRF check.
    let (s, _) = t.post("/v1/accounts", &ann.token, json!({"currency": "USD"})).await;
    assert_eq!(s, StatusCode::CREATED);

    // Logout clears the cookies.
    let new_jar = format!(
        "ledger_access={}; ledger_csrf={}",
        cookie_value(&rotated, "ledger_access"),
        cookie_value(&rotated, "ledger_csrf")
    );
    let r = t
        .http
        .post(format!("{}/v1/auth/logout", t.base))
        .header("cookie", &new_jar)
        .header("x-csrf-token", cookie_value(&rotated, "ledger_csrf"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cleared = set_cookies(r.headers());
    assert!(cleared.iter().all(|c| c.contains("Max-Age=0")), "{cleared:?}");
    let r = t.http.get(format!("{}/v1/accounts", t.base)).header("cookie", &new_jar).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "the session ended");
    t.cleanup().await;
}

#[tokio::test]
async fn insecure_cookies_drop_only_the_secure_flag() {
    let t = TestLedger::start_with(|c| c.insecure_cookies = true).await;
    let ann = t.person().await;
    let (s, _, headers) = t
        .request(
            Method::POST,
            "/v1/auth/login",
            None,
            None,
            Some(json!({"email": ann.email, "password": PASSWORD, "cookies": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let cookies = set_cookies(&headers);
    assert_eq!(cookies.len(), 3);
    assert!(cookies.iter().all(|c| !c.contains("Secure") && c.contains("SameSite=Strict")), "{cookies:?}");
    t.cleanup().await;
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn an_unknown_email_costs_what_a_wrong_password_costs() {
    // Throttling would cut the measurement short; it has its own test.
    let t = TestLedger::start_with(|c| c.login_failures_before_backoff = 10_000).await;
    let ann = t.person().await;
    let (mut unknown, mut wrong) = (vec![], vec![]);
    for round in 0..9 {
        let started = Instant::now();
        let (s, v) = t.login(&format!("nobody-{round}@example.com"), "some password 123", json!({})).await;
        unknown.push(started.elapsed());
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"));
        let started = Instant::now();
        let (s, v) = t.login(&ann.email, "some password 123", json!({})).await;
        wrong.push(started.elapsed());
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"));
    }
    let (unknown, wrong) = (median(unknown), median(wrong));
    let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
    // Both verify one argon2id hash; without the dummy hash an unknown email
    // would answer in a few milliseconds, a ratio far below this bound.
    assert!((0.6..=1.6).contains(&ratio), "unknown {unknown:?} vs wrong {wrong:?}: ratio {ratio:.2}");
    t.cleanup().await;
}

#[tokio::test]
async fn repeated_failed_logins_back_off_with_retry_after() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    for attempt in 1..=5 {
        let (s, v) = t.login(&ann.email, "wrong password!", json!({})).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"), "attempt {attempt}: {v}");
    }
    // Even the right password waits now.
    let (s, v, headers) = t
        .request(Method::POST, "/v1/auth/login", None, None, Some(json!({"email": ann.email, "password": PASSWORD})))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "too-many-attempts"), "{v}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "the first backoff is 2 s: {retry_after}");
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (s, v) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK, "after Retry-After the right password works: {v}");
    // The IP keeps its count (a success does not reset it): one more failure
    // from this address, even for another email, and it waits again.
    let (s, v) = t.login("x@example.com", "whatever12", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "invalid-credentials"), "{v}");
    let (s, v, headers) = t
        .request(
            Method::POST,
            "/v1/auth/login",
            None,
            None,
            Some(json!({"email": "x@example.com", "password": "whatever12"})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "too-many-attempts"), "{v}");
    assert!(headers.contains_key("retry-after"));
    t.cleanup().await;
}

#[tokio::test]
async fn two_factor_login_needs_a_fresh_code_or_a_one_time_recovery_code() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let (s, setup) = t.post_plain("/v1/auth/2fa/setup", &ann.token, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{setup}");
    let secret_b32 = setup["secret"].as_str().unwrap().to_owned();
    assert!(setup["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/Ledger:"));
    let secret = data_encoding::BASE32_NOPAD.decode(secret_b32.as_bytes()).unwrap();
    // Not on until confirmed.
    let (s, _) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = t.post_plain("/v1/auth/2fa/confirm", &ann.token, json!({"code": "000000"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "two-factor-invalid"), "{v}");
    // Confirm with the code of the previous step, so the current one is still unused for the login below.
    let (s, confirmed) =
        t.post_plain("/v1/auth/2fa/confirm", &ann.token, json!({"code": totp::code_at(&secret, now() - 30)})).await;
    assert_eq!(s, StatusCode::OK, "{confirmed}");
    let recovery: Vec<String> =
        confirmed["recovery_codes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert_eq!(recovery.len(), 10);

    let (s, v) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "two-factor-required"), "{v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({"totp": "123456"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "two-factor-invalid"), "{v}");
    let current = totp::code_at(&secret, now());
    let (s, v) = t.login(&ann.email, PASSWORD, json!({"totp": current})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({"totp": current})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "two-factor-invalid"), "a code works once: {v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({"totp": recovery[3]})).await;
    assert_eq!(s, StatusCode::OK, "a recovery code works: {v}");
    let (s, v) = t.login(&ann.email, PASSWORD, json!({"totp": recovery[3]})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "two-factor-invalid"), "once: {v}");
    // The secret is stored sealed, never in the clear.
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT secret_sealed FROM two_factor WHERE user_id = $1::uuid")
        .bind(&ann.id)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_slice()));

    let (s, v) =
        t.post_plain("/v1/auth/2fa/disable", &ann.token, json!({"password": PASSWORD, "code": recovery[0]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK, "off again");
    t.cleanup().await;
}

#[tokio::test]
async fn api_keys_are_scoped_shown_once_and_revocable() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let account = t.account(&ann.token, "USD").await;
    t.settle().await;
    let (s, v) = t.post_plain("/v1/api-keys", &ann.token, json!({"name": "reporting", "scopes": ["read"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let read_key = v["key"].as_str().unwrap().to_owned();
    let key_id = v["key_id"].as_str().unwrap().to_owned();
    assert!(read_key.starts_with("lk_"));
    let (s, v) =
        t.post_plain("/v1/api-keys", &ann.token, json!({"name": "payouts", "scopes": ["read", "write"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let write_key = v["key"].as_str().unwrap().to_owned();

    let (s, v) = t.get(&format!("/v1/accounts/{account}"), &read_key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.post(&format!("/v1/accounts/{account}/deposits"), &read_key, json!({"amount": "1.00"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "insufficient-scope"), "{v}");
    let (s, v) = t.post(&format!("/v1/accounts/{account}/deposits"), &write_key, json!({"amount": "1.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Keys cannot manage credentials.
    let (s, v) = t.post_plain("/v1/api-keys", &write_key, json!({"name": "more", "scopes": ["write"]})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "insufficient-scope"), "{v}");

    let (s, list) = t.get("/v1/api-keys", &ann.token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(&read_key[3..]), "no secret in the list");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_prefix <> '' AND key_hash = sha256($1::bytea)")
            .bind(read_key.as_bytes())
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "stored as its SHA-256 hash");

    let (s, v, _) = t.request(Method::DELETE, &format!("/v1/api-keys/{key_id}"), Some(&ann.token), None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.get(&format!("/v1/accounts/{account}"), &read_key).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "revoked: {v}");
    let (s, v, _) = t.request(Method::DELETE, &format!("/v1/api-keys/{key_id}"), Some(&ann.token), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "api-key-not-found"), "{v}");
    let (s, v) = t.post_plain("/v1/api-keys", &ann.token, json!({"name": "x", "scopes": ["admin"]})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    t.cleanup().await;
}

#[tokio::test]
async fn frozen_accounts_refuse_debits_and_credits() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let bob = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let a = t.account(&ann.token, "EUR").await;
    let b = t.account(&bob.token, "EUR").await;
    t.deposit(&ann.token, &a, "50.00").await;
    t.deposit(&bob.token, &b, "50.00").await;
    let ledger = &t;
    let admin_post = |path: String, key: &'static str, body: Value| {
        let token = admin.token.clone();
        async move {
            let (s, v, _) = ledger.request(Method::POST, &path, Some(&token), Some(key), Some(body)).await;
            (s, v)
        }
    };
    let (s, v) = admin_post(format!("/v1/admin/accounts/{a}/freeze"), "f1", json!({"reason": "  "})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "a reason is required: {v}");
    let (s, v) = admin_post(format!("/v1/admin/accounts/{a}/freeze"), "f2", json!({"reason": "court order"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let position = v["position"].as_i64().unwrap();
    for (path, token, body) in [
        (format!("/v1/accounts/{a}/withdrawals"), &ann.token, json!({"amount": "1.00"})),
        (format!("/v1/accounts/{a}/deposits"), &ann.token, json!({"amount": "1.00"})),
        ("/v1/transfers".to_owned(), &ann.token, json!({"from_account": a, "to_account": b, "amount": "1.00"})),
        ("/v1/transfers".to_owned(), &bob.token, json!({"from_account": b, "to_account": a, "amount": "1.00"})),
    ] {
        let (s, v) = t.post(&path, token, body).await;
        assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "account-frozen"), "{path}: {v}");
    }
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position={position}"), &ann.token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["frozen"], true);
    assert_eq!(v["balance"], "50.00");
    let (s, v) = admin_post(format!("/v1/admin/accounts/{a}/freeze"), "f3", json!({"reason": "again"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "account-already-frozen"), "{v}");
    let (s, v) = admin_post(format!("/v1/admin/accounts/{a}/unfreeze"), "u1", json!({"reason": "lifted"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        t.post("/v1/transfers", &bob.token, json!({"from_account": b, "to_account": a, "amount": "1.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // The admin action is an event with its reason and actor.
    let (reason, actor): (String, uuid::Uuid) =
        sqlx::query_as("SELECT payload->>'reason', actor_id FROM events WHERE event_type = 'AccountFrozen'")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(reason, "court order");
    assert_eq!(actor.to_string(), admin.id);
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn command_endpoints_are_rate_limited_per_user() {
    let t = TestLedger::start_with(|c| {
        c.rate_limit_per_sec = 1;
        // Registering and logging in two users takes four from the address's bucket.
        c.rate_limit_burst = 6;
    })
    .await;
    let ann = t.person().await;
    let bob = t.person().await;
    for _ in 0..6 {
        let (s, v) = t.post("/v1/accounts", &ann.token, json!({"currency": "USD"})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, v, headers) =
        t.request(Method::POST, "/v1/accounts", Some(&ann.token), Some("over"), Some(json!({"currency": "USD"}))).await;
    assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "rate-limited"), "{v}");
    assert_eq!(headers["retry-after"], "1");
    let (s, _) = t.post("/v1/accounts", &bob.token, json!({"currency": "USD"})).await;
    assert_eq!(s, StatusCode::CREATED, "each user has their own bucket");
    let (s, _) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!(s, StatusCode::OK, "reads are not limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, _) = t.post("/v1/accounts", &ann.token, json!({"currency": "USD"})).await;
    assert_eq!(s, StatusCode::CREATED, "a token refilled");
    t.cleanup().await;
}

#[tokio::test]
async fn sessions_are_listed_revoked_and_ended_by_password_change() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let (s, phone) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let phone_token = phone["access_token"].as_str().unwrap().to_owned();
    let (s, v) = t.get("/v1/auth/sessions", &ann.token).await;
    assert_eq!(s, StatusCode::OK);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert_eq!(items.iter().filter(|i| i["current"] == true).count(), 1);
    assert!(items.iter().all(|i| i["ip"] == "127.0.0.1"), "{v}");
    let phone_session =
        items.iter().find(|i| i["current"] == false).unwrap()["session_id"].as_str().unwrap().to_owned();

    // Another user cannot end Ann's session.
    let bob = t.person().await;
    let (s, v, _) =
        t.request(Method::DELETE, &format!("/v1/auth/sessions/{phone_session}"), Some(&bob.token), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "session-not-found"), "{v}");
    let (s, _, _) =
        t.request(Method::DELETE, &format!("/v1/auth/sessions/{phone_session}"), Some(&ann.token), None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t.get("/v1/accounts", &phone_token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A password change keeps this session and ends the others.
    let (_, laptop) = t.login(&ann.email, PASSWORD, json!({})).await;
    let laptop_token = laptop["access_token"].as_str().unwrap().to_owned();
    let (s, v) = t
        .post_plain(
            "/v1/auth/password",
            &ann.token,
            json!({"current_password": "not it at all", "new_password": "a new long password"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "invalid-credentials"), "{v}");
    let (s, v) = t
        .post_plain("/v1/auth/password", &ann.token, json!({"current_password": PASSWORD, "new_password": "short"}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t
        .post_plain(
            "/v1/auth/password",
            &ann.token,
            json!({"current_password": PASSWORD, "new_password": "a new long password"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = t.get("/v1/accounts", &laptop_token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "other sessions ended");
    let (s, _) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!(s, StatusCode::OK, "this one stays");
    let (s, _) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = t.login(&ann.email, "a new long password", json!({})).await;
    assert_eq!(s, StatusCode::OK);

    // Logout-all ends every session, this one included.
    let (s, _) = t.post_plain("/v1/auth/logout-all", &ann.token, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t.get("/v1/accounts", &ann.token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The user sees their security events, newest first.
    let (_, again) = t.login(&ann.email, "a new long password", json!({})).await;
    let token = again["access_token"].as_str().unwrap();
    let head = t.head().await;
    let (s, v) = t.get(&format!("/v1/me/activity?min_position={head}"), token).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let kinds: Vec<&str> = v["items"].as_array().unwrap().iter().map(|i| i["event_type"].as_str().unwrap()).collect();
    for expected in ["UserRegistered", "UserLoggedIn", "SessionRevoked", "PasswordChanged", "LoginFailed", "LoggedOut"]
    {
        assert!(kinds.contains(&expected), "{expected} in {kinds:?}");
    }
    assert_eq!(kinds[0], "UserLoggedIn");
    let (_, bobs) = t.get(&format!("/v1/me/activity?min_position={head}"), &bob.token).await;
    assert!(bobs["items"].as_array().unwrap().iter().all(|i| i["event_type"] != "PasswordChanged"), "only their own");
    t.cleanup().await;
}

#[tokio::test]
async fn a_slow_request_is_answered_503_timeout_not_left_hanging() {
    let t = TestLedger::start_with(|c| c.request_timeout = Duration::from_millis(300)).await;
    let ann = t.person().await;
    let started = Instant::now();
    // The read-your-writes wait (5 s) outlasts the request limit.
    let (s, v, headers) =
        t.request(Method::GET, "/v1/accounts?min_position=999999", Some(&ann.token), None, None).await;
    assert_eq!((s, code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "timeout"), "{v}");
    assert!(headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(3));
    t.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_parallel_guesses_gets_no_more_tries_than_the_limit() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let guesses: Vec<String> = (0..20).map(|i| format!("wrong password {i}")).collect();
    let answers = futures::future::join_all(guesses.iter().map(|g| t.login(&ann.email, g, json!({})))).await;
    let wrong = answers.iter().filter(|(s, _)| *s == StatusCode::UNAUTHORIZED).count();
    let throttled =
        answers.iter().filter(|(s, v)| *s == StatusCode::TOO_MANY_REQUESTS && code(v) == "too-many-attempts").count();
    assert_eq!(wrong + throttled, 20, "{answers:?}");
    assert!(wrong <= 5, "only the first five guesses were checked, not {wrong}");
    t.cleanup().await;
}

#[tokio::test]
async fn the_current_password_cannot_be_guessed_through_password_change() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    for i in 0..5 {
        let body = json!({"current_password": format!("guess number {i}"), "new_password": "a new long password"});
        let (s, v) = t.post_plain("/v1/auth/password", &ann.token, body).await;
        assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "invalid-credentials"), "{v}");
    }
    let body = json!({"current_password": PASSWORD, "new_password": "a new long password"});
    let (s, v) = t.post_plain("/v1/auth/password", &ann.token, body).await;
    assert_eq!((s, code(&v)), (StatusCode::TOO_MANY_REQUESTS, "too-many-attempts"), "{v}");
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'LoginFailed' AND payload->>'reason' = 'wrong_password'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(failures, 5, "each wrong guess is recorded");
    t.cleanup().await;
}

#[tokio::test]
async fn a_planted_csrf_cookie_and_header_pair_is_refused() {
    let t = TestLedger::start_with(|c| c.insecure_cookies = true).await;
    let ann = t.person().await;
    let (s, _, headers) = t
        .request(
            Method::POST,
            "/v1/auth/login",
            None,
            None,
            Some(json!({"email": ann.email, "password": PASSWORD, "cookies": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let cookies = set_cookies(&headers);
    let access = cookie_value(&cookies, "ledger_access");
    let r = t
        .http
        .post(format!("{}/v1/accounts", t.base))
        .header("cookie", format!("ledger_access={access}; ledger_csrf=evil"))
        .header("x-csrf-token", "evil")
        .header("idempotency-key", "planted")
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the token must be the session's own");
    t.cleanup().await;
}

#[tokio::test]
async fn no_credit_lands_after_a_freeze_even_when_they_race() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let a = t.account(&ann.token, "USD").await;
    let path = format!("/v1/accounts/{a}/deposits");
    let deposits = futures::future::join_all((0..15).map(|_| t.post(&path, &ann.token, json!({"amount": "1.00"}))));
    let freeze_path = format!("/v1/admin/accounts/{a}/freeze");
    let freeze =
        t.request(Method::POST, &freeze_path, Some(&admin.token), Some("race-freeze"), Some(json!({"reason": "race"})));
    let (answers, (s, v, _)) = tokio::join!(deposits, freeze);
    assert_eq!(s, StatusCode::OK, "{v}");
    for (s, v) in &answers {
        assert!(*s == StatusCode::CREATED || code(v) == "account-frozen", "{s} {v}");
    }
    // In the log's order, nothing credits the account after its freeze.
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events t, events f
         WHERE f.event_type = 'AccountFrozen' AND t.event_type = 'TransferRecorded'
           AND t.payload->>'to_account' = $1 AND (t.transaction_id, t.position) > (f.transaction_id, f.position)",
    )
    .bind(&a)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(late, 0);
    t.cleanup().await;
}

/// Concurrent session checks are read together (`session_checks`): each
/// answer must be what a check of its own answers, for every kind of session
/// and in any mix, duplicates included.
#[tokio::test]
async fn batched_session_checks_answer_what_each_check_answers_alone() {
    let t = TestLedger::start().await;
    let ann = t.person().await;
    let bob = t.person().await;
    let cat = t.person().await;
    let dan = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/users/{}/block", bob.id),
            Some(&admin.token),
            Some("block-bob"),
            Some(json!({"reason": "chargebacks"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = t.request(Method::POST, "/v1/auth/logout", Some(&cat.token), None, None).await;
    assert!(s.is_success(), "{s} {v}");
    // The sessions table is the write side's own state, not the log: expiring
    // Dan's session by hand is what the clock would do.
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 minute' WHERE user_id = $1")
        .bind(dan.id.parse::<Uuid>().unwrap())
        .execute(&t.pool)
        .await
        .unwrap();
    let session_of = |person: &crate::harness::Person| -> (Uuid, Uuid) {
        let user = person.id.parse::<Uuid>().unwrap();
        (user, claims_of(&person.token)["sid"].as_str().unwrap().parse().unwrap())
    };
    let (ann_id, ann_sid) = session_of(&ann);
    let (bob_id, bob_sid) = session_of(&bob);
    let (admin_id, admin_sid) = session_of(&admin);
    let valid = |user_id, role, blocked| CredentialCheck::Valid(Principal { user_id, role, blocked });
    let cases: Vec<((Uuid, Uuid), CredentialCheck)> = vec![
        ((ann_id, ann_sid), valid(ann_id, Role::User, false)),
        ((bob_id, bob_sid), valid(bob_id, Role::User, true)),
        (session_of(&cat), CredentialCheck::Ended),
        (session_of(&dan), CredentialCheck::Ended),
        ((ann_id, bob_sid), CredentialCheck::Ended),
        ((Uuid::new_v4(), ann_sid), CredentialCheck::Ended),
        ((ann_id, Uuid::new_v4()), CredentialCheck::Ended),
        ((admin_id, admin_sid), valid(admin_id, Role::Admin, false)),
    ];

    // The statement itself, over all kinds at once.
    let pairs: Vec<(Uuid, Uuid)> = cases.iter().map(|c| c.0).collect();
    let answers = ledger_commands::session_checks::check_all(&t.pool, &pairs).await.expect("one statement");
    for ((pair, expected), answer) in cases.iter().zip(&answers) {
        assert_eq!(answer, expected, "{pair:?}");
    }

    // Through the ledger, 400 checks in flight at once (so batches form),
    // against the same checks made one at a time.
    let batched = ledger::ledger_for(&t.config, t.pool.clone()).with_batched_session_checks(t.pool.clone(), 2);
    let alone = ledger::ledger_for(&t.config, t.pool.clone());
    let mix: Vec<usize> = (0..400).map(|i| (i * 7 + i / 8) % cases.len()).collect();
    let together =
        futures::future::join_all(mix.iter().map(|&i| batched.check_session(cases[i].0 .0, cases[i].0 .1))).await;
    for (&i, answer) in mix.iter().zip(together) {
        let one = alone.check_session(cases[i].0 .0, cases[i].0 .1).await.expect("check alone");
        assert_eq!(answer.expect("batched check"), one, "{:?}", cases[i].0);
        assert_eq!(one, cases[i].1, "{:?}", cases[i].0);
    }
    t.cleanup().await;
}

/// A transfer's session is checked by its own write (group commit reads it
/// with the group's records; the single-command path checks it first), not
/// before it: an ended session or a blocked user still moves nothing, gets
/// the answer a check before the handler gives, and leaves its key unused.
async fn a_transfer_under_an_ended_session_or_a_blocked_user_moves_nothing(writers: usize) {
    let t = TestLedger::start_with(|c| c.group_commit_writers = writers).await;
    let ann = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let from = t.account(&ann.token, "EUR").await;
    let to = t.account(&ann.token, "EUR").await;
    t.deposit(&ann.token, &from, "100.00").await;
    let (s, phone) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{phone}");
    let phone_token = phone["access_token"].as_str().expect("token").to_owned();
    let (s, v) = t.post_plain("/v1/auth/logout", &phone_token, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // The ended session's transfer races live ones, so groups hold both kinds.
    let body = json!({"from_account": from, "to_account": to, "amount": "1.00"});
    let transfer = |token: &str, key: &str| {
        let (token, key, body) = (token.to_owned(), key.to_owned(), body.clone());
        let t = &t;
        async move { t.request(Method::POST, "/v1/transfers", Some(&token), Some(&key), Some(body)).await }
    };
    let ended = futures::future::join_all((0..4).map(|i| transfer(&phone_token, &format!("ended-{i}"))));
    let live = futures::future::join_all((0..8).map(|i| transfer(&ann.token, &format!("live-{i}"))));
    let (ended, live) = tokio::join!(ended, live);
    for (s, v, _) in &ended {
        assert_eq!((*s, code(v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");
        assert_eq!(v["detail"], "the session has ended; log in again");
    }
    for (s, v, _) in &live {
        assert_eq!(*s, StatusCode::CREATED, "{v}");
    }
    // The refused requests' keys were never recorded: under a live session
    // the same key and body is a new transfer, not a replay.
    let (s, v, headers) = transfer(&ann.token, "ended-0").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(headers.get("idempotent-replayed").is_none(), "a first answer, not a replay");

    // A key recorded while a session was live is not replayed to it once it
    // has ended: the session is refused before the key is looked up.
    let (s, tablet) = t.login(&ann.email, PASSWORD, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{tablet}");
    let tablet_token = tablet["access_token"].as_str().expect("token").to_owned();
    let (s, v, _) = transfer(&tablet_token, "from-the-tablet").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = t.post_plain("/v1/auth/logout", &tablet_token, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = transfer(&tablet_token, "from-the-tablet").await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "not the recorded answer: {v}");

    block(&t, &admin.token, &ann.id).await;
    let (s, v, _) = transfer(&ann.token, "blocked").await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "user-blocked"), "{v}");

    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE idempotency_key IN ('blocked', 'ended-1', 'ended-2', 'ended-3')",
    )
    .fetch_one(&t.pool)
    .await
    .expect("commands counted");
    assert_eq!(recorded, 0, "nothing recorded under a refused request's key");
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'TransferRecorded' AND payload->>'from_account' = $1",
    )
    .bind(&from)
    .fetch_one(&t.pool)
    .await
    .expect("transfers counted");
    assert_eq!(moved, 10, "the eight live transfers, the key reused under a live session, the tablet's");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_grouped_transfer_under_an_ended_session_or_a_blocked_user_moves_nothing() {
    a_transfer_under_an_ended_session_or_a_blocked_user_moves_nothing(2).await;
}

#[tokio::test]
async fn a_transfer_alone_under_an_ended_session_or_a_blocked_user_moves_nothing() {
    a_transfer_under_an_ended_session_or_a_blocked_user_moves_nothing(0).await;
}

#[tokio::test]
async fn a_revoked_token_does_not_spend_its_users_rate_limit() {
    let t = TestLedger::start_with(|c| {
        c.rate_limit_per_sec = 1;
        c.rate_limit_burst = 8;
    })
    .await;
    let ann = t.person().await;
    let from = t.account(&ann.token, "EUR").await;
    let to = t.account(&ann.token, "EUR").await;
    t.deposit(&ann.token, &from, "10.00").await;
    let (_, phone) = t.login(&ann.email, PASSWORD, json!({})).await;
    let phone_token = phone["access_token"].as_str().expect("token").to_owned();
    let (s, v) = t.post_plain("/v1/auth/logout", &phone_token, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A stolen token, revoked, keeps knocking: refused every time, and
    // (after the first refusal) without taking the user's tokens.
    let body = json!({"from_account": from, "to_account": to, "amount": "1.00"});
    for _ in 0..20 {
        let (s, v) = t.post("/v1/transfers", &phone_token, body.clone()).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");
    }
    let (s, v) = t.post("/v1/transfers", &ann.token, body).await;
    assert_eq!(s, StatusCode::CREATED, "the live session still has its rate: {v}");
    t.cleanup().await;
}

/// A hold's placement, capture and release check their session in the read
/// after their locks, in a group (beside transfers) and alone: an ended session
/// or a blocked user changes nothing, gets the answer a check at the door
/// gives, is not answered from a key recorded while it was live, and leaves
/// its key unused.
#[tokio::test]
async fn a_grouped_hold_command_under_an_ended_session_or_a_blocked_user_changes_nothing() {
    a_hold_command_under_an_ended_session_or_a_blocked_user_changes_nothing(2).await;
}

#[tokio::test]
async fn a_hold_command_alone_under_an_ended_session_or_a_blocked_user_changes_nothing() {
    a_hold_command_under_an_ended_session_or_a_blocked_user_changes_nothing(0).await;
}

async fn a_hold_command_under_an_ended_session_or_a_blocked_user_changes_nothing(writers: usize) {
    let t = TestLedger::start_with(|c| c.group_commit_writers = writers).await;
    let ann = t.person().await;
    let shop = t.person().await;
    let admin = t.person_with_role(Role::Admin).await;
    let from = t.account(&ann.token, "EUR").await;
    let to = t.account(&shop.token, "EUR").await;
    t.deposit(&ann.token, &from, "100.00").await;
    let session = |email: String| {
        let t = &t;
        async move {
            let (s, v) = t.login(&email, PASSWORD, json!({})).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["access_token"].as_str().expect("token").to_owned()
        }
    };
    let post = |path: String, token: String, key: &'static str, body: Value| {
        let t = &t;
        async move { t.request(Method::POST, &path, Some(&token), Some(key), Some(body)).await }
    };
    let place = json!({"from_account": from, "to_account": to, "amount": "30.00"});

    let phone = session(ann.email.clone()).await;
    let (s, held, _) = post("/v1/holds".into(), phone.clone(), "held-on-the-phone", place.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{held}");
    let hold_id = held["hold_id"].as_str().expect("hold id").to_owned();
    let (s, v) = t.post_plain("/v1/auth/logout", &phone, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Each ended session's first request reaches the write (later ones are
    // refused at the door once this process has seen it ended): the
    // recorded key first, so the write must check the session before it.
    let (s, v, _) = post("/v1/holds".into(), phone.clone(), "held-on-the-phone", place.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "not the recorded answer: {v}");
    assert_eq!(v["detail"], "the session has ended; log in again");
    let (s, v, _) = post("/v1/holds".into(), phone.clone(), "ended-place", place.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");

    let capture = format!("/v1/holds/{hold_id}/capture");
    let release = format!("/v1/holds/{hold_id}/release");
    for (path, key) in [(&capture, "ended-capture"), (&release, "ended-release")] {
        let tablet = session(shop.email.clone()).await;
        let (s, v) = t.post_plain("/v1/auth/logout", &tablet, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, v, _) = post(path.clone(), tablet, key, json!({})).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{v}");
    }

    block(&t, &admin.token, &ann.id).await;
    let (s, v, _) = post("/v1/holds".into(), ann.token.clone(), "blocked-place", place).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "user-blocked"), "{v}");

    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands
         WHERE idempotency_key IN ('ended-place', 'ended-capture', 'ended-release', 'blocked-place')",
    )
    .fetch_one(&t.pool)
    .await
    .expect("commands counted");
    assert_eq!(recorded, 0, "nothing recorded under a refused request's key");
    let placed: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'HoldPlaced'")
        .fetch_one(&t.pool)
        .await
        .expect("holds counted");
    assert_eq!(placed, 1, "only the hold placed while the session was live");
    // The refused capture and release left the hold pending: the payee's
    // live session captures all of it.
    let (s, v, _) = post(capture, shop.token.clone(), "live-capture", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["amount"], "30.00", "{v}");
    t.assert_invariants().await;
    t.cleanup().await;
}
