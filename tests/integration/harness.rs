//! A real ledger per test: its own PostgreSQL database and NATS prefix on the
//! machine's services, served in-process on an ephemeral port.

use ledger::config::{Config, Roles};
use ledger_commands::store::{self, LogPoint, RecordedEvent};
use ledger_domain::events::Role;
use ledger_domain::{fold_balances, FoldedBalance};
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, StatusCode};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery";

/// A registered, logged-in user.
#[derive(Clone, Debug)]
pub struct Person {
    pub id: String,
    pub email: String,
    pub token: String,
    pub refresh: String,
}

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn test_config(db: &str, prefix: &str, nats_url: &str) -> Config {
    Config {
        database_url: format!("postgres://postgres@127.0.0.1:5432/{db}"),
        nats_url: nats_url.to_owned(),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        nats_prefix: prefix.to_owned(),
        jwt_secret: b"integration-test-secret-integration-test".to_vec(),
        jwt_secret_is_default: false,
        db_max_connections: 16,
        db_query_connections: 8,
        group_commit_writers: 2,
        bulk_max_backlog: 500,
        bulk_max_wait: Duration::from_secs(2),
        read_wait: Duration::from_secs(5),
        relay_poll: Duration::from_millis(20),
        projector_pace: Duration::ZERO,
        relay_pace: Duration::ZERO,
        secret_key: b"integration-test-sealing-key-integration-test".to_vec(),
        secret_key_is_default: false,
        insecure_cookies: false,
        // Off by default in tests that hammer one user on purpose; the
        // rate-limit test turns it on.
        rate_limit_per_sec: 0,
        rate_limit_burst: 100,
        login_failures_before_backoff: 5,
        request_timeout: Duration::from_secs(30),
        fees: Default::default(),
        order_auto_accept: true,
        hold_expiry_interval: Duration::from_millis(100),
    }
}

/// Two users' tokens and accounts, from `TestLedger::funded_pair`.
pub struct FundedPair {
    pub payer: String,
    pub payer_account: String,
    pub payee: String,
    pub payee_account: String,
}

/// Removes a test's database and JetStream stream, whatever is left of them.
async fn remove(db: &str, nats_url: &str, nats_prefix: &str) {
    if let Ok(client) = async_nats::connect(nats_url).await {
        let js = async_nats::jetstream::new(client);
        let names = ledger_commands::nats::NatsNames::new(nats_prefix);
        let _ = js.delete_stream(names.stream()).await;
    }
    if let Ok(admin) = PgPool::connect(PG_ADMIN).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await;
    }
}

pub struct TestLedger {
    pub base: String,
    pub http: Client,
    pub pool: PgPool,
    pub config: Config,
    pub db: String,
    running: Option<ledger::Running>,
    /// Set by `cleanup`; else `Drop` removes the database and stream.
    cleaned: bool,
}

/// A test that fails (panics) never reaches `cleanup`: its database and
/// stream are removed here instead, so failed runs do not pile up on the
/// machine's services. The test's own runtime cannot be blocked on from
/// inside it, so the removal runs on a thread and runtime of its own,
/// waited for, at most 10 s.
impl Drop for TestLedger {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (db, url, prefix) = (self.db.clone(), self.config.nats_url.clone(), self.config.nats_prefix.clone());
        let removal = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), remove(&db, &url, &prefix)).await;
                });
            }
        });
        let _ = removal.join();
    }
}

impl TestLedger {
    pub async fn start() -> TestLedger {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestLedger {
        Self::start_with_roles(adjust, Roles::ALL).await
    }

    /// A service running only some roles (one must serve HTTP).
    pub async fn start_with_roles(adjust: impl FnOnce(&mut Config), roles: Roles) -> TestLedger {
        let id = Uuid::new_v4().simple().to_string();
        let db = format!("ledger_test_{}", &id[..16]);
        let mut config = test_config(&db, &format!("t{}", &id[..16]), "nats://127.0.0.1:4222");
        adjust(&mut config);
        let running = ledger::start(config.clone(), roles).await.expect("ledger starts");
        let addr = running.addr.expect("http role listens");
        let pool = PgPool::connect(&config.database_url).await.expect("test pool");
        TestLedger {
            base: format!("http://{addr}"),
            http: Client::new(),
            pool,
            config,
            db,
            running: Some(running),
            cleaned: false,
        }
    }

    /// Stops the service; its database stays for the test to read.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Stops the service and removes its database and JetStream stream.
    pub async fn cleanup(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.pool.close().await;
        remove(&self.db, &self.config.nats_url, &self.config.nats_prefix).await;
        self.cleaned = true;
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, HeaderMap) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let response = req.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body read");
        let value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, value, headers)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let key = Uuid::new_v4().to_string();
        let (s, v, _) = self.request(Method::POST, path, Some(token), Some(&key), Some(body)).await;
        (s, v)
    }

    /// A POST without an Idempotency-Key (the /v1/auth and /v1/api-keys routes).
    pub async fn post_plain(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self.request(Method::POST, path, Some(token), None, Some(body)).await;
        (s, v)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.request(Method::GET, path, Some(token), None, None).await;
        (s, v)
    }

    /// Registers a fresh user and returns (user_id, access token).
    pub async fn user(&self) -> (String, String) {
        let u = self.person().await;
        (u.id, u.token)
    }

    /// Registers and logs in a fresh user.
    pub async fn person(&self) -> Person {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let (s, v, _) = self
            .request(Method::POST, "/v1/auth/register", None, None, Some(json!({"email": email, "password": PASSWORD})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["user_id"].as_str().expect("user_id").to_owned();
        let (s, v) = self.login(&email, PASSWORD, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        Person {
            id,
            email,
            token: v["access_token"].as_str().expect("token").to_owned(),
            refresh: v["refresh_token"].as_str().expect("refresh token").to_owned(),
        }
    }

    /// A fresh user with a role, given the way `ledger admin create-user` gives it.
    pub async fn person_with_role(&self, role: Role) -> Person {
        let p = self.person().await;
        let ledger = ledger::ledger_for(&self.config, self.pool.clone());
        ledger.assign_role(p.id.parse().expect("uuid"), role, "test fixture").await.expect("role assigned");
        p
    }

    /// POST /v1/auth/login with extra body members.
    pub async fn login(&self, email: &str, password: &str, extra: Value) -> (StatusCode, Value) {
        let mut body = json!({"email": email, "password": password});
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        let (s, v, _) = self.request(Method::POST, "/v1/auth/login", None, None, Some(body)).await;
        (s, v)
    }

    pub async fn account(&self, token: &str, currency: &str) -> String {
        let (s, v) = self.post("/v1/accounts", token, json!({"currency": currency})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["account_id"].as_str().expect("account_id").to_owned()
    }

    pub async fn deposit(&self, token: &str, account: &str, amount: &str) -> i64 {
        let (s, v) = self.post(&format!("/v1/accounts/{account}/deposits"), token, json!({"amount": amount})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["position"].as_i64().expect("position")
    }

    /// Two fresh users with an account each in `currency`, the payer's
    /// funded with `deposit`: the opening of most money-moving tests.
    pub async fn funded_pair(&self, currency: &str, deposit: &str) -> FundedPair {
        let (_, payer) = self.user().await;
        let (_, payee) = self.user().await;
        let payer_account = self.account(&payer, currency).await;
        let payee_account = self.account(&payee, currency).await;
        self.deposit(&payer, &payer_account, deposit).await;
        FundedPair { payer, payer_account, payee, payee_account }
    }

    /// The balance as the query API shows it, after the read side applied `position`.
    pub async fn balance(&self, token: &str, account: &str, position: i64) -> String {
        let (s, v) = self.get(&format!("/v1/accounts/{account}?min_position={position}"), token).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["balance"].as_str().expect("balance").to_owned()
    }

    pub async fn log(&self) -> Vec<RecordedEvent> {
        let mut conn = self.pool.acquire().await.expect("conn");
        store::read_range(&mut conn, LogPoint::START, LogPoint { transaction_id: u64::MAX >> 1, position: i64::MAX })
            .await
            .expect("log")
    }

    /// The position of the log's last event in tailing order. Positions can
    /// commit out of order, so this is not always `max(position)`; waiting
    /// for it covers every committed event.
    pub async fn head(&self) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT position FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .expect("head")
            .unwrap_or(0)
    }

    /// Waits until `count_sql` (a `SELECT count(*) …`) counts something:
    /// for a test that must act once another task has reached a point.
    pub async fn wait_until_counted(&self, count_sql: &str) {
        while sqlx::query_scalar::<_, i64>(count_sql).fetch_one(&self.pool).await.expect("count") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every projection has applied the whole log.
    pub async fn settle(&self) {
        let head = self.head().await;
        if head > 0 {
            ledger_projections::read_side::wait_for(&self.pool, head, Duration::from_secs(30))
                .await
                .expect("read side catches up");
        }
    }

    /// Checks every money invariant against the log and the read models.
    pub async fn assert_invariants(&self) {
        self.settle().await;
        let events: Vec<_> = self.log().await.iter().map(|e| e.decode().expect("decodes")).collect();
        let folded = fold_balances(&events);
        let mut sums: BTreeMap<String, Decimal> = BTreeMap::new();
        for b in folded.values() {
            *sums.entry(b.currency.clone()).or_default() += b.balance;
            if b.kind == ledger_domain::events::AccountKind::User {
                assert!(b.balance >= Decimal::ZERO, "user balance below zero: {b:?}");
            }
        }
        for (currency, sum) in sums {
            assert!(sum.is_zero(), "{currency} sums to {sum}");
        }
        let mut conn = self.pool.acquire().await.expect("conn");
        let rows = ledger_projections::balances::all(&mut conn).await.expect("balances");
        let read: BTreeMap<Uuid, FoldedBalance> = rows
            .into_iter()
            .map(|r| {
                if r.kind == "user" {
                    assert!(r.available >= Decimal::ZERO, "available below zero: {r:?}");
                }
                (
                    r.account_id,
                    FoldedBalance {
                        currency: r.currency,
                        kind: if r.kind == "system" {
                            ledger_domain::events::AccountKind::System
                        } else {
                            ledger_domain::events::AccountKind::User
                        },
                        balance: r.balance,
                    },
                )
            })
            .collect();
        if read != folded {
            // Say what the log held, to tell a read-side fault from a log read fault.
            let in_table: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&self.pool).await.expect("count");
            eprintln!("the fold read {} events; the events table holds {in_table}", events.len());
        }
        assert_eq!(read, folded, "balances read model equals a fold of the log");
        // available = balance - pending holds, per account, in the read model.
        let off: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM balances b
             WHERE b.available <> b.balance - coalesce((SELECT sum(amount) FROM holds h
                                                        WHERE h.from_account = b.account_id AND h.status = 'pending'), 0)",
        )
        .fetch_one(&self.pool)
        .await
        .expect("available check");
        assert_eq!(off, 0, "available equals balance less pending holds");
        let over: i64 = sqlx::query_scalar("SELECT count(*) FROM holds WHERE captured_amount > amount")
            .fetch_one(&self.pool)
            .await
            .expect("captured check");
        assert_eq!(over, 0, "captured <= held");
        // Every movement appears exactly once on each side of the statements.
        let transfers = events.iter().filter(|e| matches!(e, ledger_domain::Event::TransferRecorded(_))).count() as i64;
        let entries: i64 =
            sqlx::query_scalar("SELECT count(*) FROM statement_entries").fetch_one(&self.pool).await.expect("count");
        assert_eq!(entries, transfers * 2);
        let broken: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM statement_entries s JOIN balances b USING (account_id)
             WHERE s.entry_no = (SELECT max(entry_no) FROM statement_entries x WHERE x.account_id = s.account_id)
               AND s.balance_after <> b.balance",
        )
        .fetch_one(&self.pool)
        .await
        .expect("running balances");
        assert_eq!(broken, 0, "each statement's last running balance equals the account balance");
    }
}
