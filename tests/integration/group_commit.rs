//! Group commit and its write-side account cache: the cache is a lower bound
//! that never lets a debit through that the log would refuse, and a refusal
//! it causes is checked again against the log.

use crate::harness::{FundedPair, TestLedger};
use ledger_commands::{CommandEnvelope, LedgerCommand};
use ledger_domain::DomainError;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// Advisory locks waited for in this test's database (other tests share the server).
const WAITING_ADVISORY: &str = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

async fn transfer(t: &TestLedger, token: &str, from: &str, to: &str, amount: &str) -> (StatusCode, Value) {
    t.post("/v1/transfers", token, json!({"from_account": from, "to_account": to, "amount": amount})).await
}

/// Ann's account with 10.00 and Bob's account, both in EUR.
async fn two_accounts() -> (TestLedger, String, String, String) {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("EUR", "10.00").await;
    (t, ann, a, b)
}

#[tokio::test]
async fn a_credit_the_cache_missed_is_found_before_refusing() {
    let (t, ann, a, b) = two_accounts().await;
    // The writer now knows `a` at 0.00 ...
    assert_eq!(transfer(&t, &ann, &a, &b, "10.00").await.0, StatusCode::CREATED);
    // ... and a deposit (a credit, in another stream) does not move `a`'s stream.
    t.deposit(&ann, &a, "5.00").await;
    let (s, v) = transfer(&t, &ann, &a, &b, "5.00").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = transfer(&t, &ann, &a, &b, "0.01").await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/insufficient-funds")));
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_debit_by_another_path_is_seen_by_the_next_transfer() {
    let (t, ann, a, b) = two_accounts().await;
    assert_eq!(transfer(&t, &ann, &a, &b, "4.00").await.0, StatusCode::CREATED);
    // A withdrawal (not grouped) takes the rest; the cached 6.00 is stale.
    let (s, v) = t.post(&format!("/v1/accounts/{a}/withdrawals"), &ann, json!({"amount": "6.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = transfer(&t, &ann, &a, &b, "1.00").await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/insufficient-funds")));
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_hundred_concurrent_transfers_from_one_account_never_overdraw() {
    let (t, ann, a, b) = two_accounts().await;
    let answers = futures::future::join_all((0..100).map(|_| transfer(&t, &ann, &a, &b, "0.25"))).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let short = answers.iter().filter(|(_, v)| v["type"] == "/problems/insufficient-funds").count();
    assert_eq!((ok, short), (40, 60));
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "0.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn concurrent_transfers_under_one_key_move_money_once() {
    let (t, ann, a, b) = two_accounts().await;
    let body = json!({"from_account": a, "to_account": b, "amount": "1.00"});
    let answers = futures::future::join_all(
        (0..20).map(|_| t.request(Method::POST, "/v1/transfers", Some(&ann), Some("one-key"), Some(body.clone()))),
    )
    .await;
    let first = &answers[0].1;
    for (s, v, _) in &answers {
        assert_eq!(*s, StatusCode::CREATED, "{v}");
        assert_eq!(v, first, "every answer is the first one");
    }
    let replayed = answers.iter().filter(|(_, _, h)| h.get("idempotent-replayed").is_some()).count();
    assert_eq!(replayed, 19);
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "9.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

fn render(e: &DomainError) -> (u16, Value) {
    (422, json!({ "detail": e.to_string() }))
}

/// What `render` said of a refusal (empty for an answer that is not one).
fn detail(outcome: &ledger_commands::Outcome) -> &str {
    if outcome.status != 422 {
        return "";
    }
    outcome.body["detail"].as_str().unwrap_or_default()
}

/// A hold of `amount` from one account to another, with the default expiry.
fn place_hold(from_account: Uuid, to_account: Uuid, amount: &str) -> LedgerCommand {
    LedgerCommand::PlaceHold {
        from_account,
        to_account,
        amount: amount.into(),
        expires_in_seconds: None,
        reference: None,
    }
}

/// The envelope of an instance's `n`th command, under a key of its own.
fn turn(actor: Uuid, n: u32) -> CommandEnvelope {
    CommandEnvelope {
        actor,
        idempotency_key: format!("turn-{n}"),
        request_hash: vec![n as u8],
        correlation_id: None,
        client: Default::default(),
        causation_id: None,
        unchecked_session: None,
    }
}

/// Two writers with caches of their own (two instances) take turns debiting
/// one account: each sees the other's debits through the stream's version.
#[tokio::test]
async fn two_instances_debiting_one_account_never_overdraw() {
    let t = TestLedger::start().await;
    let (ann_id, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let b = t.account(&bob, "EUR").await;
    t.deposit(&ann, &a, "10.00").await;
    let one = ledger::ledger_for(&t.config, t.pool.clone()).with_group_commit(1);
    let two = ledger::ledger_for(&t.config, t.pool.clone()).with_group_commit(1);
    let actor: Uuid = ann_id.parse().expect("uuid");
    let send = |ledger: &ledger_commands::Ledger, n: u32| {
        let ledger = ledger.clone();
        let command = LedgerCommand::Transfer {
            from_account: a.parse().expect("uuid"),
            to_account: b.parse().expect("uuid"),
            amount: "4.00".into(),
            reference: None,
        };
        let envelope = turn(actor, n);
        async move { ledger.execute(&envelope, command, render).await.expect("executed").status }
    };
    assert_eq!(send(&one, 1).await, 201); // one knows 6.00
    assert_eq!(send(&two, 2).await, 201); // two knows 2.00; one's view is stale
    assert_eq!(send(&one, 3).await, 422, "the stale cache must not allow this debit");
    assert_eq!(send(&two, 4).await, 422);
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "2.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// A group only tries its commands' keys: one whose key another transaction
/// holds (here a test's own, as a running batch or a concurrent retry would)
/// leaves the group and waits alone, and the rest of the group commits. With
/// one writer, a group waiting on that key used to hold up every transfer.
#[tokio::test]
async fn a_command_whose_key_is_held_elsewhere_does_not_hold_up_its_group() {
    let t = TestLedger::start_with(|c| c.group_commit_writers = 1).await;
    let (ann_id, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let b = t.account(&bob, "EUR").await;
    t.deposit(&ann, &a, "10.00").await;
    let ann_id: Uuid = ann_id.parse().unwrap();

    let mut holder = t.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ledger_commands::idempotency::key_lock_id(ann_id, "held-key"))
        .execute(&mut *holder)
        .await
        .unwrap();
    let body = json!({"from_account": a, "to_account": b, "amount": "1.00"});
    let held = t.request(Method::POST, "/v1/transfers", Some(&ann), Some("held-key"), Some(body.clone()));
    let others = async {
        // Once the held key's command waits for its lock, others follow.
        t.wait_until_counted(WAITING_ADVISORY).await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(20), transfer(&t, &ann, &a, &b, "2.00")).await;
        let other = other.expect("a transfer under another key is not held up");
        holder.commit().await.unwrap();
        other
    };
    let ((hs, hv, _), (os, ov)) = tokio::join!(held, others);
    assert_eq!(os, StatusCode::CREATED, "{ov}");
    assert_eq!(hs, StatusCode::CREATED, "{hv}");
    let p = hv["position"].as_i64().unwrap().max(ov["position"].as_i64().unwrap());
    assert_eq!(t.balance(&ann, &a, p).await, "7.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Ann's accounts a and c with 10.00 each and Bob's account b, on a ledger
/// with the default group commit (one writer and a standby).
async fn writer_and_standby() -> (TestLedger, String, String, String, String) {
    let t = TestLedger::start().await;
    assert_eq!(t.config.group_commit_writers, 2);
    let (_, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let c = t.account(&ann, "EUR").await;
    let b = t.account(&bob, "EUR").await;
    t.deposit(&ann, &a, "10.00").await;
    t.deposit(&ann, &c, "10.00").await;
    (t, ann, a, c, b)
}

/// While `holder` keeps a 1.00 transfer a -> b's group waiting (once
/// `waiting_sql` counts the wait), a 2.00 transfer c -> b is written by the
/// standby; then the holder rolls back and the first goes through too.
async fn the_transfer_behind_is_not_held_up(
    (t, ann, a, c, b): (TestLedger, String, String, String, String),
    holder: sqlx::Transaction<'_, sqlx::Postgres>,
    waiting_sql: &str,
) {
    let held = transfer(&t, &ann, &a, &b, "1.00");
    let behind = async {
        t.wait_until_counted(waiting_sql).await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(20), transfer(&t, &ann, &c, &b, "2.00")).await;
        let other = other.expect("a transfer behind the waiting group is written by the standby writer");
        holder.rollback().await.unwrap();
        other
    };
    let ((hs, hv), (os, ov)) = tokio::join!(held, behind);
    assert_eq!(os, StatusCode::CREATED, "{ov}");
    assert_eq!(hs, StatusCode::CREATED, "the waiting group goes on once the other transaction is gone: {hv}");
    let p = hv["position"].as_i64().unwrap().max(ov["position"].as_i64().unwrap());
    assert_eq!(t.balance(&ann, &a, p).await, "9.00");
    assert_eq!(t.balance(&ann, &c, p).await, "8.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_group_waiting_on_an_account_lock_does_not_hold_up_the_transfers_behind_it() {
    let ledger = writer_and_standby().await;
    // Another writer (an atomic batch, a hold, another instance's group)
    // holds account a's debit lock.
    let mut holder = ledger.0.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(ledger_commands::ledger::ACCOUNT_LOCK_CLASS)
        .bind(ledger_commands::ledger::lock_key(ledger.2.parse().unwrap()))
        .execute(&mut *holder)
        .await
        .unwrap();
    the_transfer_behind_is_not_held_up(ledger, holder, WAITING_ADVISORY).await;
}

#[tokio::test]
async fn a_group_stuck_in_postgresql_does_not_hold_up_the_transfers_behind_it() {
    let ledger = writer_and_standby().await;
    // Another transaction has inserted (not committed) the next event of
    // a's stream: the group appending a's debit waits on the unique index.
    let mut holder = ledger.0.pool.begin().await.unwrap();
    // pg_locks shows the 32-bit transaction id.
    let holder_xid: String = sqlx::query_scalar("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload)
         SELECT gen_random_uuid(), $1, max(stream_version) + 1, 'Placeholder', 1, '{}' FROM events
         WHERE stream_id = $1",
    )
    .bind(format!("account-{}", ledger.2))
    .execute(&mut *holder)
    .await
    .unwrap();
    let waiting = format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted
           AND transactionid::text = '{holder_xid}'"
    );
    the_transfer_behind_is_not_held_up(ledger, holder, &waiting).await;
}

/// A freeze moves only the frozen account's stream: a group whose writer
/// cached the credited account as open must see it (after the locks, the
/// group reads each cached stream's later events and applies them).
#[tokio::test]
async fn a_transfer_on_a_warm_cache_to_an_account_frozen_since_is_refused() {
    let (t, ann, a, b) = two_accounts().await;
    let admin = t.person_with_role(ledger_domain::events::Role::Admin).await;
    // The writer now caches `b` as open (its stream at version 1).
    assert_eq!(transfer(&t, &ann, &a, &b, "1.00").await.0, StatusCode::CREATED);
    let (s, v, _) = t
        .request(
            Method::POST,
            &format!("/v1/admin/accounts/{b}/freeze"),
            Some(&admin.token),
            Some("freeze-b"),
            Some(json!({"reason": "court order"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = transfer(&t, &ann, &a, &b, "1.00").await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/account-frozen")), "{v}");
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "9.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Holds are grouped with transfers: placements and transfers racing on one
/// account are decided in order within a group, each on what the earlier
/// ones left, so together they never reserve or move more than the funds.
#[tokio::test]
async fn holds_and_transfers_racing_on_one_account_never_overdraw() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: bob, payee_account: b } = t.funded_pair("EUR", "10.00").await;
    let (tr, payer, from, to) = (&t, ann.as_str(), a.as_str(), b.as_str());
    let calls = (0..60).map(|i| async move {
        let (s, v) = if i % 2 == 0 {
            let body = json!({"from_account": from, "to_account": to, "amount": "0.50", "reference": format!("h{i}")});
            tr.post("/v1/holds", payer, body).await
        } else {
            transfer(tr, payer, from, to, "0.50").await
        };
        (i % 2 == 0, s, v)
    });
    let answers = futures::future::join_all(calls).await;
    let placed: Vec<String> = answers
        .iter()
        .filter(|(is_hold, s, _)| *is_hold && *s == StatusCode::CREATED)
        .map(|(_, _, v)| v["hold_id"].as_str().expect("hold_id").to_owned())
        .collect();
    let moved = answers.iter().filter(|(is_hold, s, _)| !*is_hold && *s == StatusCode::CREATED).count();
    let short = answers.iter().filter(|(_, _, v)| v["type"] == "/problems/insufficient-funds").count();
    assert_eq!((placed.len() + moved, short), (20, 40), "10.00 covers twenty of 0.50: {answers:?}");
    let head = t.head().await;
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    let balance = format!("{}.{:02}", (20 - moved) / 2, (20 - moved) % 2 * 50);
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some(balance.as_str()), Some("0.00")));

    // Captured together, every hold moves its amount once.
    let paths: Vec<String> = placed.iter().map(|h| format!("/v1/holds/{h}/capture")).collect();
    let captures = futures::future::join_all(paths.iter().map(|path| t.post(path, &bob, json!({})))).await;
    assert!(captures.iter().all(|(s, _)| *s == StatusCode::CREATED), "{captures:?}");
    let head = t.head().await;
    assert_eq!(t.balance(&ann, &a, head).await, "0.00");
    assert_eq!(t.balance(&bob, &b, head).await, "10.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Two instances, each with its own cache, place and resolve holds on one
/// account: each sees the other's holds and resolutions through the stream's
/// version, so a stale cache never lets a hold through that the log refuses,
/// nor resolves a hold twice.
#[tokio::test]
async fn two_instances_placing_and_capturing_holds_on_one_account_never_overdraw() {
    let t = TestLedger::start().await;
    let (ann_id, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let b = t.account(&bob, "EUR").await;
    t.deposit(&ann, &a, "10.00").await;
    let one = ledger::ledger_for(&t.config, t.pool.clone()).with_group_commit(1);
    let two = ledger::ledger_for(&t.config, t.pool.clone()).with_group_commit(1);
    let ann_id: Uuid = ann_id.parse().expect("uuid");
    let (a_id, b_id): (Uuid, Uuid) = (a.parse().expect("uuid"), b.parse().expect("uuid"));
    let send = |ledger: &ledger_commands::Ledger, actor: Uuid, n: u32, command: LedgerCommand| {
        let ledger = ledger.clone();
        let envelope = turn(actor, n);
        async move { ledger.execute(&envelope, command, render).await.expect("executed") }
    };
    let place = |amount: &str| place_hold(a_id, b_id, amount);
    let first = send(&one, ann_id, 1, place("6.00")).await; // one knows 4.00 available
    assert_eq!(first.status, 201, "{}", first.body);
    let hold_id: Uuid = first.body["hold_id"].as_str().and_then(|h| h.parse().ok()).expect("hold_id");
    assert_eq!(send(&two, ann_id, 2, place("3.00")).await.status, 201); // 1.00 left; one's view is stale
    let refused = send(&one, ann_id, 3, place("4.00")).await;
    assert_eq!(refused.status, 422);
    assert!(detail(&refused).contains("has 1.00 available"), "the stale cache must not allow this hold: {refused:?}");
    // The system captures the first hold through two; one still has it pending.
    let capture = || LedgerCommand::CaptureHold { hold_id, amount: None };
    assert_eq!(send(&two, Uuid::nil(), 4, capture()).await.status, 201);
    let again = send(&one, Uuid::nil(), 5, capture()).await;
    assert!(detail(&again).contains("no longer pending"), "a hold is captured once: {again:?}");
    assert_eq!(send(&one, ann_id, 6, place("1.00")).await.status, 201);
    let short = send(&one, ann_id, 7, place("0.01")).await;
    assert!(detail(&short).contains("has 0.00 available"), "{short:?}");
    let head = t.head().await;
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some("4.00"), Some("0.00")));
    assert_eq!(t.balance(&bob, &b, head).await, "6.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// A hold and transfers queued together are decided in one group, in the
/// order they came, each on what the earlier ones left, and written in one
/// transaction: the writer (one, no standby) is held on another group while
/// they queue.
#[tokio::test]
async fn a_hold_and_transfers_queued_together_are_decided_in_order_in_one_transaction() {
    let t = TestLedger::start().await;
    let (ann_id, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let (a, c, b) = (t.account(&ann, "EUR").await, t.account(&ann, "EUR").await, t.account(&bob, "EUR").await);
    t.deposit(&ann, &a, "10.00").await;
    t.deposit(&ann, &c, "10.00").await;
    let one = ledger::ledger_for(&t.config, t.pool.clone()).with_group_commit(1);
    let actor: Uuid = ann_id.parse().expect("uuid");
    let id = |s: &str| -> Uuid { s.parse().expect("uuid") };
    let transfer = |from: &str, amount: &str| LedgerCommand::Transfer {
        from_account: id(from),
        to_account: id(&b),
        amount: amount.into(),
        reference: None,
    };
    let spawn = |n: u32, command: LedgerCommand| {
        let (ledger, envelope) = (one.clone(), turn(actor, n));
        tokio::spawn(async move { ledger.execute(&envelope, command, render).await.expect("executed") })
    };
    // The test holds c's debit lock: the writer's group with a transfer from c waits on it ...
    let mut holder = t.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(ledger_commands::ledger::ACCOUNT_LOCK_CLASS)
        .bind(ledger_commands::ledger::lock_key(id(&c)))
        .execute(&mut *holder)
        .await
        .unwrap();
    let first = spawn(1, transfer(&c, "1.00"));
    t.wait_until_counted(WAITING_ADVISORY).await;
    // ... while these queue behind it, in this order.
    let pause = std::time::Duration::from_millis(50);
    let hold = spawn(2, place_hold(id(&a), id(&b), "6.00"));
    tokio::time::sleep(pause).await;
    let fits = spawn(3, transfer(&a, "4.00"));
    tokio::time::sleep(pause).await;
    let short = spawn(4, transfer(&a, "0.01"));
    tokio::time::sleep(pause * 4).await;
    holder.rollback().await.unwrap();
    let (first, hold, fits, short) =
        (first.await.unwrap(), hold.await.unwrap(), fits.await.unwrap(), short.await.unwrap());
    assert_eq!((first.status, hold.status, fits.status), (201, 201, 201), "{hold:?} {fits:?}");
    assert!(detail(&short).contains("has 0.00 available"), "the hold and the transfer took it all: {short:?}");
    // One transaction wrote the three: their records, and the hold's and the transfer's events.
    let records: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM commands WHERE user_id = $1 AND idempotency_key = ANY($2)",
    )
    .bind(actor)
    .bind(vec!["turn-2", "turn-3", "turn-4"])
    .fetch_one(&t.pool)
    .await
    .unwrap();
    let positions = vec![hold.position.expect("position"), fits.position.expect("position")];
    let events: i64 = sqlx::query_scalar("SELECT count(DISTINCT transaction_id) FROM events WHERE position = ANY($1)")
        .bind(&positions)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!((records, events), (1, 1), "one transaction for the hold and the transfers");
    let head = t.head().await;
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some("6.00"), Some("0.00")));
    t.assert_invariants().await;
    t.cleanup().await;
}
