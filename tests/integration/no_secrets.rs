//! A scripted session against the real `ledger` binary at debug log level,
//! then a search of its logs and of the events table for every secret the
//! session handled: passwords, hashes, tokens, TOTP secret, recovery codes,
//! API key. Also creates the first admin with `ledger admin create-user`.

use crate::harness::{PASSWORD, PG_ADMIN};
use ledger_commands::totp;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::io::Write;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;
use tokio::process::Command;
use uuid::Uuid;

const JWT_SECRET: &str = "no-secrets-test-jwt-secret-0123456789abcdef";
const SEALING_KEY: &str = "no-secrets-test-sealing-key-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

#[tokio::test]
async fn no_secret_reaches_the_logs_or_the_event_log() {
    let id = Uuid::new_v4().simple().to_string();
    let db = format!("ledger_test_{}", &id[..16]);
    let prefix = format!("t{}", &id[..16]);
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!("ledger-no-secrets-{id}.log"));
    let env = [
        ("LEDGER_DATABASE_URL", format!("postgres://postgres@127.0.0.1:5432/{db}")),
        ("LEDGER_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ("LEDGER_NATS_PREFIX", prefix.clone()),
        ("LEDGER_JWT_SECRET", JWT_SECRET.to_owned()),
        ("LEDGER_SECRET_KEY", SEALING_KEY.to_owned()),
        ("LEDGER_LOG", "debug".to_owned()),
        ("LEDGER_INSECURE_COOKIES", "1".to_owned()),
    ];

    // The first admin, from the CLI, password on stdin.
    let admin_email = format!("admin-{}@example.com", &id[..8]);
    let admin_password = "admin password from stdin";
    let mut cli = StdCommand::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["admin", "create-user", "--email", &admin_email, "--role", "admin"])
        .envs(env.iter().cloned())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ledger admin create-user runs");
    cli.stdin.take().expect("stdin").write_all(format!("{admin_password}\n").as_bytes()).expect("password written");
    let created = cli.wait_with_output().expect("CLI finishes");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let cli_output =
        format!("{}{}", String::from_utf8_lossy(&created.stdout), String::from_utf8_lossy(&created.stderr));
    let admin_id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(Uuid::parse_str(&admin_id).is_ok(), "prints the new user's id: {admin_id:?}");

    let log = std::fs::File::create(&log_path).expect("log file");
    let mut server = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("serve")
        .envs(env.iter().cloned())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("ledger serve starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = Client::new();
    let mut up = false;
    for _ in 0..200 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the server answered /healthz");

    let mut secrets: Vec<(String, String)> = vec![
        ("password".into(), PASSWORD.into()),
        ("admin password".into(), admin_password.into()),
        ("JWT secret".into(), JWT_SECRET.into()),
        ("sealing key".into(), SEALING_KEY.into()),
    ];
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut req = http.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let json_of = |r: reqwest::Response| async move {
        let status = r.status();
        (status, r.json::<Value>().await.expect("JSON body"))
    };

    // The admin logs in (proves the CLI's role) and looks at the user list.
    let (s, v) =
        json_of(post("/v1/auth/login", None, json!({"email": admin_email, "password": admin_password})).await.unwrap())
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let admin_token = v["access_token"].as_str().unwrap().to_owned();
    secrets.push(("admin access token".into(), admin_token.clone()));
    secrets.push(("admin refresh token".into(), v["refresh_token"].as_str().unwrap().to_owned()));
    let r = http.get(format!("{base}/v1/admin/users")).bearer_auth(&admin_token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let email = format!("ann-{}@example.com", &id[..8]);
    let (s, v) =
        json_of(post("/v1/auth/register", None, json!({"email": email, "password": PASSWORD})).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _) =
        json_of(post("/v1/auth/login", None, json!({"email": email, "password": "a wrong password"})).await.unwrap())
            .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    secrets.push(("wrong password".into(), "a wrong password".into()));
    let (_, v) =
        json_of(post("/v1/auth/login", None, json!({"email": email, "password": PASSWORD})).await.unwrap()).await;
    let access = v["access_token"].as_str().unwrap().to_owned();
    let refresh = v["refresh_token"].as_str().unwrap().to_owned();
    let (s, v) = json_of(post("/v1/auth/refresh", None, json!({"refresh_token": refresh})).await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let access2 = v["access_token"].as_str().unwrap().to_owned();
    secrets.push(("access token".into(), access.clone()));
    secrets.push(("refresh token".into(), refresh));
    secrets.push(("rotated refresh token".into(), v["refresh_token"].as_str().unwrap().to_owned()));
    secrets.push(("second access token".into(), access2.clone()));

    let (s, setup) = json_of(post("/v1/auth/2fa/setup", Some(&access2), json!({})).await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{setup}");
    let secret_b32 = setup["secret"].as_str().unwrap().to_owned();
    let secret = data_encoding::BASE32_NOPAD.decode(secret_b32.as_bytes()).unwrap();
    let (s, confirmed) = json_of(
        post("/v1/auth/2fa/confirm", Some(&access2), json!({"code": totp::code_at(&secret, now())})).await.unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{confirmed}");
    secrets.push(("TOTP secret".into(), secret_b32.clone()));
    secrets.push(("TOTP secret, hex".into(), secret.iter().map(|b| format!("{b:02x}")).collect()));
    for c in confirmed["recovery_codes"].as_array().unwrap() {
        secrets.push(("recovery code".into(), c.as_str().unwrap().to_owned()));
    }
    let recovery = confirmed["recovery_codes"][0].as_str().unwrap().to_owned();
    let (s, v) = json_of(
        post("/v1/auth/login", None, json!({"email": email, "password": PASSWORD, "totp": recovery})).await.unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let (s, key) = json_of(
        post("/v1/api-keys", Some(&access2), json!({"name": "ci", "scopes": ["read", "write"]})).await.unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    let api_key = key["key"].as_str().unwrap().to_owned();
    secrets.push(("API key".into(), api_key.clone()));
    let r = http.get(format!("{base}/v1/accounts")).bearer_auth(&api_key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let (s, v) = json_of(
        post(
            "/v1/auth/password",
            Some(&access2),
            json!({"current_password": PASSWORD, "new_password": "the second password"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    secrets.push(("new password".into(), "the second password".into()));
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"email": email, "password": "the second password", "cookies": true, "totp": totp::code_at(&secret, now() + 30)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for c in r.headers().get_all("set-cookie") {
        let value = c.to_str().unwrap().split(';').next().unwrap().split_once('=').unwrap().1.to_owned();
        secrets.push(("cookie token".into(), value));
    }

    let pool = PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{db}")).await.unwrap();
    let hashes: Vec<String> =
        sqlx::query_scalar("SELECT password_hash FROM credentials").fetch_all(&pool).await.unwrap();
    for h in hashes {
        secrets.push(("password hash".into(), h));
    }
    // Let the relay and projectors log whatever they log about these events.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill().await.expect("server stopped");
    let _ = server.wait().await;

    let logs = std::fs::read_to_string(&log_path).expect("logs read") + &cli_output;
    assert!(logs.contains("UserLoggedIn") || logs.contains("/v1/auth/login"), "the debug log saw the session");
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT concat_ws(' ', event_type, stream_id, payload::text, client_ip, user_agent, command_id::text) FROM events",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let events = events.join("\n");
    assert!(
        events.contains("TwoFactorEnabled") && events.contains("ApiKeyCreated") && events.contains("PasswordChanged")
    );
    let mut leaks = vec![];
    for (what, secret) in &secrets {
        if secret.len() < 8 {
            continue;
        }
        if logs.contains(secret.as_str()) {
            leaks.push(format!("{what} in the logs"));
        }
        if events.contains(secret.as_str()) {
            leaks.push(format!("{what} in the events table"));
        }
    }
    for marker in ["$argon2", "password_hash"] {
        if events.contains(marker) {
            leaks.push(format!("{marker} in the events table"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?} (logs at {})", log_path.display());

    pool.close().await;
    let _ = std::fs::remove_file(&log_path);
    if let Ok(client) = async_nats::connect("nats://127.0.0.1:4222").await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(ledger_commands::nats::NatsNames::new(&prefix).stream()).await;
    }
    if let Ok(admin) = PgPool::connect(PG_ADMIN).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await;
    }
}
