use crate::harness::{FundedPair, TestLedger};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

fn nats_server_binary() -> String {
    std::env::var("LEDGER_TEST_NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

/// A NATS server of this test's own, so stopping it disturbs nobody else.
async fn start_nats(port: u16, dir: &std::path::Path) -> Child {
    let child = Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server starts (set LEDGER_TEST_NATS_SERVER to its path)");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not listen on {port}");
}

/// A NATS server's store directory, removed when this goes out of scope,
/// also when the test fails.
struct StoreDir(std::path::PathBuf);

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A NATS server of this test's own on a free port, with its store in a
/// fresh directory: its port and directory, to restart it.
async fn own_nats() -> (Child, u16, StoreDir) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = StoreDir(std::env::temp_dir().join(format!("ledger-nats-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    (start_nats(port, &dir.0).await, port, dir)
}

#[tokio::test]
async fn read_side_converges_after_nats_restarts_mid_stream() {
    let (mut nats, port, dir) = own_nats().await;
    // Batches wait for the read side past one event behind: they must not
    // wait for a read side that NATS being down has stopped.
    let t = TestLedger::start_with(|c| {
        c.nats_url = format!("nats://127.0.0.1:{port}");
        c.bulk_max_backlog = 1;
    })
    .await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } =
        t.funded_pair("USD", "1000.00").await;

    // A stream of commands; NATS dies in the middle of it.
    let mut positions = vec![];
    for i in 0..60 {
        if i == 20 {
            nats.kill().await.unwrap();
            let _ = nats.wait().await;
        }
        let (s, v) = t
            .post("/v1/transfers", &ann, serde_json::json!({"from_account": a, "to_account": b, "amount": "1.50"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "commands succeed while NATS is down: {v}");
        positions.push(v["position"].as_i64().unwrap());
        if i == 25 || i == 35 {
            let item =
                |n: u32| json!({"key": format!("b{i}-{n}"), "from_account": a, "to_account": b, "amount": "1.00"});
            let body = json!({"atomic": i == 25, "transfers": [item(1), item(2)]});
            let (s, v, _) = t
                .request(Method::POST, "/v1/transfers/batch", Some(&ann), Some(&format!("batch-{i}")), Some(body))
                .await;
            assert!(s.is_success(), "batches succeed while NATS is down: {v}");
            positions.push(v["position"].as_i64().unwrap());
        }
        if i == 40 {
            let (s, v, _) = t.request(Method::GET, "/readyz", None, None, None).await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
            assert_eq!(v["nats"], "unreachable");
        }
    }
    nats = start_nats(port, &dir.0).await;
    let last = *positions.last().unwrap();
    t.settle().await;
    assert_eq!(t.balance(&ann, &a, last).await, "906.00", "1000 - 60 x 1.50 - 4 x 1.00");
    assert_eq!(t.balance(&bob, &b, last).await, "94.00");
    t.assert_invariants().await;
    t.cleanup().await;
    let _ = nats.kill().await;
    drop(dir);
}

/// Sends a process a signal (`kill -STOP`, `-CONT`).
fn signal(pid: &str, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, pid]).status().expect("kill runs");
    assert!(status.success(), "kill {sig} {pid}");
}

/// A stopped process, resumed when this goes out of scope, also when the
/// test fails while it is stopped.
struct Stopped(String);

impl Stopped {
    fn stop(pid: String) -> Stopped {
        signal(&pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// A NATS server that hangs (stopped, not gone: no 409, no closed socket,
/// nothing at all) is noticed by the pulls' missed idle heartbeats
/// (`nats::PULL_HEARTBEAT`, two of them): the projector's run starts again
/// and its catch-up applies from the log what was committed meanwhile. Each
/// later run gives NATS's set-up two heartbeats, not the client's 10 s
/// request timeout, so what is committed later in the hang is applied too.
#[tokio::test]
async fn a_hung_nats_does_not_hold_the_read_side_back() {
    let (mut nats, port, dir) = own_nats().await;
    let t = TestLedger::start_with(|c| c.nats_url = format!("nats://127.0.0.1:{port}")).await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } =
        t.funded_pair("USD", "100.00").await;
    t.settle().await;

    let transfer = |amount: &str| json!({"from_account": a, "to_account": b, "amount": amount});
    let hung = Stopped::stop(nats.id().expect("nats-server runs").to_string());
    let during_the_hang = async {
        for (amount, after) in [("30.00", "30.00"), ("10.00", "40.00")] {
            let (s, v) = t.post("/v1/transfers", &ann, transfer(amount)).await;
            assert_eq!(s, StatusCode::CREATED, "commands do not wait for NATS: {v}");
            let position = v["position"].as_i64().unwrap();
            // About 2 s for the first here, also on a loaded machine; at a
            // 5 s heartbeat, 10 s. The second comes with a later run.
            ledger_projections::read_side::wait_for(&t.pool, position, Duration::from_secs(6))
                .await
                .expect("the read side applies the transfer from the log while NATS hangs");
            assert_eq!(t.balance(&bob, &b, position).await, after);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), during_the_hang).await.expect("the test goes on while NATS hangs");
    drop(hung);

    // NATS back: the relay publishes what it held, and deliveries go on.
    let (s, v) = t.post("/v1/transfers", &ann, transfer("20.00")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let position = v["position"].as_i64().unwrap();
    assert_eq!(t.balance(&ann, &a, position).await, "40.00");
    assert_eq!(t.balance(&bob, &b, position).await, "60.00");
    t.assert_invariants().await;
    t.cleanup().await;
    let _ = nats.kill().await;
    drop(dir);
}

/// Pooled connections that died while idle (a database restart, a dropped
/// TCP connection) are found by the ping before they are handed out, so the
/// next session check and command get a fresh connection instead of a 503.
#[tokio::test]
async fn connections_that_died_while_idle_are_replaced_before_use() {
    let t = TestLedger::start().await;
    let (_, token) = t.user().await;
    let account = t.account(&token, "EUR").await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'ledger' AND state = 'idle'",
    )
    .fetch_one(&t.pool)
    .await
    .expect("terminate");
    assert!(killed > 0, "the server's pool had no idle connection to kill");
    let (s, v) = t.get("/v1/accounts", &token).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/accounts/{account}/deposits"),
            Some(&token),
            Some("after-the-restart"),
            Some(serde_json::json!({"amount": "5.00"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    t.cleanup().await;
}

/// The relay looks its stream up when it starts leading and after a failed
/// publish, not before every batch: a stream deleted under it is recreated
/// at the next publish, the read side converges, and the relay's cursor,
/// saved lazily while busy, is saved once it goes idle. NATS does not always
/// tell a puller its consumer went with the stream (seen under load: the
/// payment consumers got "409 Consumer Deleted", the projector nothing); the
/// projector then notices by missed heartbeats (`PULL_HEARTBEAT`), within
/// the 5 s that `min_position` waits.
#[tokio::test]
async fn a_stream_deleted_under_the_relay_is_recreated_and_its_cursor_saved_when_idle() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let p = t.deposit(&ann, &a, "10.00").await;
    assert_eq!(t.balance(&ann, &a, p).await, "10.00");

    let client = async_nats::connect(&t.config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let names = ledger_commands::nats::NatsNames::new(&t.config.nats_prefix);
    js.delete_stream(names.stream()).await.unwrap();

    let p = t.deposit(&ann, &a, "5.00").await;
    assert_eq!(t.balance(&ann, &a, p).await, "15.00", "the read side converges");
    // The read side may have converged from the log (a projector run that
    // lost its consumer starts with a catch-up) before the relay republished.
    let mut published = 0;
    for _ in 0..100 {
        if let Ok(mut stream) = js.get_stream(names.stream()).await {
            published = stream.info().await.unwrap().state.messages;
        }
        if published >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published >= 1, "the relay recreated the stream and published to it");
    t.assert_invariants().await;

    let head = t.head().await;
    let mut saved = 0;
    for _ in 0..100 {
        saved = sqlx::query_scalar::<_, i64>("SELECT position FROM relay_checkpoints")
            .fetch_optional(&t.pool)
            .await
            .unwrap()
            .unwrap_or(0);
        if saved == head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(saved, head, "an idle relay has saved its cursor at the head");
    t.cleanup().await;
}

/// The group-commit writer and the projector keep their own connections from
/// one group or batch to the next, without a ping before each use. Killed
/// under them (as a database restart would), the next transfer is still
/// answered 201 and applied once, and the read side still shows it.
#[tokio::test]
async fn kept_connections_that_died_are_replaced_without_failing_a_transfer() {
    let t = TestLedger::start().await;
    let (_, token) = t.user().await;
    let a = t.account(&token, "EUR").await;
    let b = t.account(&token, "EUR").await;
    t.deposit(&token, &a, "10.00").await;
    let transfer = |amount: &str| serde_json::json!({"from_account": a, "to_account": b, "amount": amount});
    // The first transfer opens the writer's connection; reading it back uses the projector's.
    let (s, v) = t.post("/v1/transfers", &token, transfer("1.00")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(t.balance(&token, &b, v["position"].as_i64().unwrap()).await, "1.00");
    let kill = |application: &'static str| {
        let pool = t.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1 AND state = 'idle'",
            )
            .bind(application)
            .fetch_one(&pool)
            .await
            .expect("terminate")
        }
    };
    assert_eq!(kill("ledger-writer").await, 1, "the writer keeps one connection");
    assert!(kill("ledger-read-side").await >= 1, "the projector keeps one connection");
    kill("ledger").await;
    // At once: within a second the writer uses its kept connection unpinged.
    let (s, v, _) =
        t.request(Method::POST, "/v1/transfers", Some(&token), Some("after-the-kill"), Some(transfer("2.00"))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let position = v["position"].as_i64().unwrap();
    assert_eq!(t.balance(&token, &b, position).await, "3.00");
    assert_eq!(t.balance(&token, &a, position).await, "7.00");
    let writers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'ledger-writer'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(writers, 1, "the group went on a fresh kept connection, not alone on the pool");
    let (s, again, _) =
        t.request(Method::POST, "/v1/transfers", Some(&token), Some("after-the-kill"), Some(transfer("2.00"))).await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    assert_eq!(again["transfer_id"], v["transfer_id"], "the same key is answered from its record");
    assert_eq!(t.balance(&token, &b, t.head().await).await, "3.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Events in the log that JetStream does not bring are applied when a
/// projector's run starts, from the log. Here no relay publishes at all; in
/// production it is a batch a failed run left unacknowledged (redelivered
/// only after `ack_wait`, 30 s) or events whose messages a lost stream took.
#[tokio::test]
async fn a_projector_starting_behind_the_log_catches_up_from_it_without_deliveries() {
    use ledger::config::Roles;
    let write_side = Roles { command_api: true, query_api: true, relay: false, projectors: false, processes: false };
    let t = TestLedger::start_with_roles(|_| {}, write_side).await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } = t.funded_pair("EUR", "10.00").await;
    let (s, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "4.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let head = t.head().await;
    let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM balances").fetch_one(&t.pool).await.unwrap();
    assert_eq!(behind, 0, "nothing has applied the log yet");

    let read_side = Roles { command_api: false, query_api: false, relay: false, projectors: true, processes: false };
    let projector = ledger::start(t.config.clone(), read_side).await.expect("projector starts");
    ledger_projections::read_side::wait_for(&t.pool, head, Duration::from_secs(10))
        .await
        .expect("the read side reaches the head of the log with nothing delivered");
    assert_eq!(t.balance(&ann, &a, head).await, "6.00");
    assert_eq!(t.balance(&bob, &b, head).await, "4.00");
    t.assert_invariants().await;
    projector.stop().await;
    t.cleanup().await;
}

/// Events committed while an older transaction is still open are not
/// settled yet (the tailing order could still change below them): a starting
/// projector waits for them instead of leaving them to deliveries that, with
/// the relay stopped, never come.
#[tokio::test]
async fn a_projector_starting_behind_the_log_waits_for_its_events_to_settle() {
    use ledger::config::Roles;
    let write_side = Roles { command_api: true, query_api: true, relay: false, projectors: false, processes: false };
    let t = TestLedger::start_with_roles(|_| {}, write_side).await;
    // An older transaction, open across the writes below.
    let mut older = t.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *older).await.unwrap();
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    t.deposit(&ann, &a, "10.00").await;
    let head = t.head().await;

    let read_side = Roles { command_api: false, query_api: false, relay: false, projectors: true, processes: false };
    let projector = ledger::start(t.config.clone(), read_side).await.expect("projector starts");
    tokio::time::sleep(Duration::from_millis(300)).await;
    older.commit().await.unwrap();
    ledger_projections::read_side::wait_for(&t.pool, head, Duration::from_secs(10))
        .await
        .expect("the read side reaches the head once the older transaction ended");
    assert_eq!(t.balance(&ann, &a, head).await, "10.00");
    projector.stop().await;
    t.cleanup().await;
}

/// While busy the relay saves its cursor at most every 100 ms, and when idle
/// only after a whole quiet poll (here 3 s): a relay told to stop saves it
/// first, so a restart does not publish the last batch again. (The poll also
/// finds events that settle late, behind another database's transaction
/// still open: it must stay well under `settle`'s limit.)
#[tokio::test]
async fn a_stopping_relay_saves_its_cursor_first() {
    let mut t = TestLedger::start_with(|c| c.relay_poll = Duration::from_secs(3)).await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("EUR", "10.00").await;
    // Back to back: the second batch comes within 100 ms of the first's save.
    for amount in ["1.00", "2.00"] {
        let (s, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": amount})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    // Published: the projector (fed by JetStream only) has applied the head.
    t.settle().await;
    let head = t.head().await;
    t.stop().await;
    let cursor: i64 = sqlx::query_scalar("SELECT position FROM relay_checkpoints").fetch_one(&t.pool).await.unwrap();
    assert_eq!(cursor, head, "the cursor is saved at the last published event");
    t.cleanup().await;
}

/// With the relay and the projector paced (reads of the log and batches at
/// most every so often, what arrives in the wait joining the next batch),
/// waves of concurrent transfers all reach the read side, once each.
#[tokio::test]
async fn a_paced_relay_and_projector_apply_every_event_once() {
    let t = TestLedger::start_with(|c| {
        c.relay_pace = Duration::from_millis(40);
        c.projector_pace = Duration::from_millis(150);
    })
    .await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } =
        t.funded_pair("EUR", "100.00").await;
    for _wave in 0..3 {
        let sends = (0..10)
            .map(|_| t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": "1.00"})));
        for (s, v) in futures::future::join_all(sends).await {
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "70.00");
    assert_eq!(t.balance(&bob, &b, head).await, "30.00");
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM statement_entries WHERE account_id = $1::uuid")
        .bind(&b)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(entries, 30, "one statement entry per transfer");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// The relay and the projector run on a thread of their own; a start that
/// fails after it started (here: the HTTP address is taken) stops it instead
/// of leaving it publishing and projecting with no service around.
#[tokio::test]
async fn a_failed_start_stops_the_read_side_it_had_started() {
    let mut t = TestLedger::start().await;
    t.stop().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = t.config.clone();
    config.http_addr = taken.local_addr().unwrap();
    let started = ledger::start(config, ledger::config::Roles::ALL).await;
    let failure = format!("{:#}", started.err().expect("the HTTP address is taken: the start fails"));
    assert!(failure.contains("binding"), "it fails at the HTTP bind, after the read side started: {failure}");
    // Every connection of the failed start closes: none of its parts runs on.
    let connections = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name IN ('ledger', 'ledger-read-side')",
        )
        .fetch_one(&t.pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connections().await > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections().await, 0, "no part of the failed start holds a connection");
    t.cleanup().await;
}
