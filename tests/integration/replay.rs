use crate::harness::TestLedger;
use serde_json::json;

async fn dump(t: &TestLedger, table: &str, order: &str) -> Vec<String> {
    sqlx::query_scalar(&format!("SELECT row_to_json(r)::text FROM {table} r ORDER BY {order}"))
        .fetch_all(&t.pool)
        .await
        .unwrap()
}

async fn dumps(t: &TestLedger) -> Vec<Vec<String>> {
    vec![
        dump(t, "balances", "account_id").await,
        dump(t, "statement_entries", "account_id, entry_no").await,
        dump(t, "transfers", "transfer_id").await,
    ]
}

fn ledger_cli(t: &TestLedger, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("LEDGER_DATABASE_URL", &t.config.database_url)
        .env("LEDGER_JWT_SECRET", "integration-test-secret-integration-test")
        .output()
        .expect("ledger runs")
}

#[tokio::test]
async fn replay_rebuilds_byte_identical_read_models() {
    let t = TestLedger::start().await;
    let mut accounts = vec![];
    for currency in ["USD", "EUR", "USD", "JPY"] {
        let (_, token) = t.user().await;
        let account = t.account(&token, currency).await;
        t.deposit(&token, &account, if currency == "JPY" { "5000" } else { "120.10" }).await;
        accounts.push((token, account, currency));
    }
    for round in 0..5 {
        let (token, from, _) = &accounts[0];
        let (_, to, _) = &accounts[2];
        t.post(
            "/v1/transfers",
            token,
            json!({"from_account": from, "to_account": to, "amount": format!("{}.01", round + 1)}),
        )
        .await;
        let (token, from, _) = &accounts[1];
        t.post(&format!("/v1/accounts/{from}/withdrawals"), token, json!({"amount": "3.30"})).await;
    }
    t.settle().await;
    let before = dumps(&t).await;
    assert!(before[0].len() >= 7 && before[1].len() >= 20);

    let out = ledger_cli(&t, &["replay", "--all"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before, "replay --all rebuilds the same bytes");

    let out = ledger_cli(&t, &["replay", "--projection", "balances"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before);

    let out = ledger_cli(&t, &["replay", "--projection", "nonsense"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown projection"));

    // The live projectors carry on from the rebuilt checkpoints without doubling anything.
    let (token, account, _) = &accounts[0];
    let p = t.deposit(token, account, "1.00").await;
    t.balance(token, account, p).await;
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_compare_reports_a_drifted_row_and_a_rebuild_repairs_it() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    t.deposit(&ann, &a, "10.00").await;
    t.settle().await;
    let before = dumps(&t).await;
    let out = ledger_cli(&t, &["replay", "--projection", "balances", "--dry-run", "--compare"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("equals the live one"));

    // A read model that drifted from the log (a bug, a hand edit) is found...
    sqlx::query("UPDATE balances SET balance = balance + 1 WHERE account_id = $1::uuid")
        .bind(&a)
        .execute(&t.pool)
        .await
        .unwrap();
    let out = ledger_cli(&t, &["replay", "--projection", "balances", "--dry-run", "--compare"]);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("only in the live model") && report.contains(&a), "{report}");
    // ...left alone by the dry run, and repaired by a rebuild.
    let (_, v) = t.get(&format!("/v1/accounts/{a}"), &ann).await;
    assert_eq!(v["balance"], "11.00");
    let out = ledger_cli(&t, &["replay", "--projection", "balances"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before);
    t.cleanup().await;
}

#[tokio::test]
async fn an_interrupted_rebuild_resumes_and_the_query_api_keeps_answering() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    for _ in 0..5 {
        t.deposit(&ann, &a, "1.00").await;
    }
    t.settle().await;
    let before = dumps(&t).await;
    let log = t.log().await;
    let halfway = log[log.len() / 2].point();
    let applied =
        ledger_projections::rebuild::build_until(&t.pool, ledger_projections::Projection::Statements, halfway, 2)
            .await
            .unwrap();
    assert!(applied > 0 && (applied as usize) < log.len());
    // Meanwhile the live tables answer as before.
    let (s, v) = t.get(&format!("/v1/accounts/{a}/transactions"), &ann).await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 5);
    let resumed = ledger_projections::rebuild::rebuild(
        &t.pool,
        ledger_projections::Projection::Statements,
        false,
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(applied as usize + resumed as usize, log.len(), "the rest, not everything again");
    assert_eq!(dumps(&t).await, before);
    t.cleanup().await;
}

#[tokio::test]
async fn a_newer_projection_version_is_rebuilt_in_the_background_at_start_up() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    t.deposit(&ann, &a, "3.00").await;
    t.settle().await;
    let before = dumps(&t).await;
    // As if the tables were built by version 0 (and wrongly so).
    sqlx::query("UPDATE projection_versions SET version = 0 WHERE projection = 'balances'")
        .execute(&t.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE balances SET balance = 42 WHERE account_id = $1::uuid")
        .bind(&a)
        .execute(&t.pool)
        .await
        .unwrap();
    // A second instance, as a deploy would start, upgrades it.
    let second = ledger::start(t.config.clone(), ledger::config::Roles::ALL).await.unwrap();
    let mut upgraded = false;
    for _ in 0..100 {
        let v: i32 = sqlx::query_scalar("SELECT version FROM projection_versions WHERE projection = 'balances'")
            .fetch_one(&t.pool)
            .await
            .unwrap();
        if v == ledger_projections::Projection::Balances.version() {
            upgraded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(upgraded);
    assert_eq!(dumps(&t).await, before, "rebuilt from the log");
    second.stop().await;
    t.cleanup().await;
}

#[tokio::test]
async fn a_bulk_rebuild_of_every_kind_of_movement_resumed_midway_equals_the_live_read_models() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, shop) = t.user().await;
    let a = t.account(&ann, "EUR").await;
    let b = t.account(&ann, "EUR").await;
    let s = t.account(&shop, "EUR").await;
    t.deposit(&ann, &a, "500.00").await;
    // References with the COPY text format's delimiters and non-ASCII text.
    for (i, reference) in ["tab\there", "line\nbreak", "back\\slash \\N", "счёт №5 ✓", ""].iter().enumerate() {
        let (st, v) = t
            .post(
                "/v1/transfers",
                &ann,
                json!({"from_account": a, "to_account": b, "amount": format!("{}.25", i + 1), "reference": reference}),
            )
            .await;
        assert!(st.is_success(), "{v}");
    }
    // A hold captured in part, a hold released, a withdrawal.
    let (st, hold) = t.post("/v1/holds", &ann, json!({"from_account": a, "to_account": s, "amount": "60.00"})).await;
    assert!(st.is_success(), "{hold}");
    let (st, v) = t
        .post(&format!("/v1/holds/{}/capture", hold["hold_id"].as_str().unwrap()), &shop, json!({"amount": "25.50"}))
        .await;
    assert!(st.is_success(), "{v}");
    let (st, other) = t.post("/v1/holds", &ann, json!({"from_account": b, "to_account": s, "amount": "1.00"})).await;
    assert!(st.is_success(), "{other}");
    let (st, v) = t.post(&format!("/v1/holds/{}/release", other["hold_id"].as_str().unwrap()), &shop, json!({})).await;
    assert!(st.is_success(), "{v}");
    let (st, v) = t.post(&format!("/v1/accounts/{b}/withdrawals"), &ann, json!({"amount": "0.75"})).await;
    assert!(st.is_success(), "{v}");
    t.settle().await;
    let before = dumps(&t).await;
    let holds = dump(&t, "holds", "hold_id").await;
    assert_eq!(holds.len(), 2);

    // Interrupted after the fourth movement, then resumed: the running
    // balances are read back from the half-built tables. Pages of 3 events:
    // page boundaries everywhere, and the encoder runs ahead of the copies.
    let log = t.log().await;
    let movements: Vec<_> = log.iter().filter(|e| e.event_type == "TransferRecorded").collect();
    assert_eq!(movements.len(), 8, "deposit, five transfers, a capture, a withdrawal");
    let fourth = movements[3].point();
    let statements = ledger_projections::Projection::Statements;
    ledger_projections::rebuild::build_until(&t.pool, statements, fourth, 3).await.unwrap();
    let all = ledger_projections::Projection::ALL;
    ledger_projections::rebuild::rebuild_all_in_pages(&t.pool, &all, false, 3, &mut |_, _| {}).await.unwrap();
    assert_eq!(dumps(&t).await, before, "a resumed bulk rebuild writes the live projectors' rows");
    assert_eq!(dump(&t, "holds", "hold_id").await, holds);
    // And from scratch, through the CLI.
    let out = ledger_cli(&t, &["replay", "--all", "--fresh"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dumps(&t).await, before);
    // The swapped-in tables have the live tables' indexes and constraints.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'
           AND tablename IN ('statement_entries', 'transfers') ORDER BY 1",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["statement_entries_pkey", "transfers_pkey"]);
    let out = ledger_cli(&t, &["replay", "--projection", "statements", "--dry-run", "--compare"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // And the live projector carries on from the rebuilt checkpoint.
    let p = t.deposit(&ann, &b, "1.00").await;
    t.balance(&ann, &b, p).await;
    let (_, v) = t.get(&format!("/v1/accounts/{b}/transactions"), &ann).await;
    assert_eq!(v["items"][0]["amount"], "1.00");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// One projector serves every read model, each with its own checkpoint. A
/// read model left behind (here: emptied and its checkpoint reset, as by a
/// mistake or a restore) is brought up from the log by the next batch, while
/// the others apply only what is new: nothing is lost and nothing doubled.
#[tokio::test]
async fn a_read_model_behind_the_others_catches_up_from_the_log_and_the_others_apply_only_the_new() {
    let t = TestLedger::start().await;
    let (_, token) = t.user().await;
    let a = t.account(&token, "EUR").await;
    let (_, other) = t.user().await;
    let b = t.account(&other, "EUR").await;
    t.deposit(&token, &a, "50.00").await;
    t.post("/v1/transfers", &token, json!({"from_account": a, "to_account": b, "amount": "7.25"})).await;
    t.settle().await;
    let entries_before = dump(&t, "statement_entries", "account_id, entry_no").await;
    assert!(entries_before.len() >= 3, "{entries_before:?}");

    // The statements read model loses everything; its checkpoint goes back to the start.
    let mut tx = t.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projection_checkpoints WHERE projection = 'statements' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM statement_entries").execute(&mut *tx).await.unwrap();
    sqlx::query("DELETE FROM transfers").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE projection_checkpoints SET transaction_id = '0', position = 0 WHERE projection = 'statements'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A new event: its batch finds the statements checkpoint far behind what was delivered.
    let p = t.deposit(&other, &b, "1.00").await;
    assert_eq!(t.balance(&other, &b, p).await, "8.25", "balances applied the new deposit once");
    t.assert_invariants().await;
    let entries_after = dump(&t, "statement_entries", "account_id, entry_no").await;
    assert!(entries_after.len() > entries_before.len(), "every entry back, plus the new deposit's");
    assert!(entries_before.iter().all(|e| entries_after.contains(e)), "the old entries are rebuilt as they were");

    // And the result is what a rebuild from the log makes.
    let out = ledger_cli(&t, &["replay", "--projection", "statements"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dump(&t, "statement_entries", "account_id, entry_no").await, entries_after);
    t.cleanup().await;
}

/// A `min_position` wait ends when this instance's projector reports it has
/// committed past the position, without waiting for its next poll of the
/// checkpoints; without such a report it polls as before.
#[tokio::test]
async fn a_wait_for_the_read_side_ends_on_the_local_projectors_report() {
    use ledger_projections::read_side;
    use std::time::Duration;
    let t = TestLedger::start().await;
    let (_, token) = t.user().await;
    let a = t.account(&token, "EUR").await;
    t.settle().await;
    // The read side is held still: its checkpoints stay where they are.
    let mut hold = t.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projection_checkpoints FOR UPDATE").execute(&mut *hold).await.unwrap();
    let p = t.deposit(&token, &a, "3.00").await;
    let point = {
        let mut conn = t.pool.acquire().await.unwrap();
        ledger_commands::store::point_of(&mut conn, p).await.unwrap().unwrap()
    };

    let waited = read_side::wait_for_applied(&t.pool, p, Duration::from_millis(300), None).await;
    assert!(matches!(waited, Err(read_side::WaitError::Lag(_))), "the checkpoints are behind: {waited:?}");

    let (report, applied) = tokio::sync::watch::channel(ledger_commands::store::ReadSideProgress::default());
    let wait = read_side::wait_for_applied(&t.pool, p, Duration::from_secs(20), Some(&applied));
    let reported = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        report.send_replace(ledger_commands::store::ReadSideProgress { through: point, highest_position: p });
    };
    let (waited, ()) = tokio::join!(wait, reported);
    assert!(waited.is_ok(), "{waited:?}");
    hold.rollback().await.unwrap();
    t.cleanup().await;
}

/// The projector remembers the last statement entry of the accounts it wrote
/// (no lookup per batch) only while the statements checkpoint is the one its
/// own commit left: the same point, saved at the same time. Another
/// instance's batch moves the point; a rebuild's swap of the tables saves the
/// checkpoint anew even at the same point. Either way the memory is not used
/// and the numbering continues from the table. Made-up accounts, so the
/// test's own running projector never meets them.
#[tokio::test]
async fn remembered_last_entries_are_used_only_while_the_checkpoint_is_the_projectors_own() {
    use ledger_commands::store::{EventMetadata, LogPoint, RecordedEvent};
    use ledger_domain::events::{Channel, TransferKind, TransferRecorded};
    use ledger_domain::Event;
    use ledger_projections::statements::{self, LastEntries};
    use rust_decimal::Decimal;
    use uuid::Uuid;

    let t = TestLedger::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let movement = |position: i64, amount: i64| {
        let t = TransferRecorded {
            transfer_id: Uuid::new_v4(),
            from_account: a,
            to_account: b,
            amount: Decimal::new(amount, 2),
            currency: "EUR".into(),
            kind: TransferKind::Transfer,
            reference: None,
            channel: Channel::Api,
        };
        let recorded = RecordedEvent {
            position,
            transaction_id: position as u64,
            event_id: Uuid::new_v4(),
            stream_id: format!("account-{a}"),
            stream_version: position,
            event_type: "TransferRecorded".into(),
            schema_version: 1,
            payload: ledger_commands::store::Payload::of(&serde_json::to_value(&t).unwrap()),
            metadata: EventMetadata { recorded_at: chrono::Utc::now(), ..Default::default() },
        };
        (recorded, Event::TransferRecorded(t))
    };
    let point = |p: i64| LogPoint { transaction_id: p as u64, position: p };
    let a_entries = || async {
        sqlx::query_as::<_, (i64, Decimal)>(
            "SELECT entry_no, balance_after FROM statement_entries WHERE account_id = $1 ORDER BY entry_no",
        )
        .bind(a)
        .fetch_all(&t.pool)
        .await
        .unwrap()
    };
    // When each checkpoint was saved (`updated_at`, as `lock_counting` reads it).
    let saved = |s: i64| chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
    let mut memory = LastEntries::default();

    // This projector's batch, from the start: it remembers a and b.
    let (r1, e1) = movement(1, 500);
    let mut tx = t.pool.begin().await.unwrap();
    let applied =
        statements::apply_remembering(&mut tx, &[(&r1, &e1)], &memory, LogPoint::START, saved(0)).await.unwrap();
    tx.commit().await.unwrap();
    memory.committed(point(1), saved(1), applied);
    assert_eq!(memory.len(), 2);

    // Another instance applies the next batch; the checkpoint moves to 2.
    let (r2, e2) = movement(2, 300);
    let mut tx = t.pool.begin().await.unwrap();
    statements::apply_all(&mut tx, &[(&r2, &e2)]).await.unwrap();
    tx.commit().await.unwrap();

    // This projector again, from checkpoint 2: its memory (entry 1, -5.00) is stale and must not be used.
    let (r3, e3) = movement(3, 200);
    let mut tx = t.pool.begin().await.unwrap();
    let applied = statements::apply_remembering(&mut tx, &[(&r3, &e3)], &memory, point(2), saved(2)).await.unwrap();
    tx.commit().await.unwrap();
    memory.committed(point(3), saved(3), applied);
    let d = |v: i64| Decimal::new(v, 2);
    assert_eq!(a_entries().await, vec![(1, d(-500)), (2, d(-800)), (3, d(-1000))]);

    // From its own checkpoint it trusts the memory: an entry written behind
    // its back (no checkpoint moved) is not looked up, and the primary key
    // refuses the repeated number instead of a wrong balance being written.
    sqlx::query(
        "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                        balance_after, counterparty_account, kind, reference, recorded_at)
         VALUES ($1, 4, 4, $2, 'debit', 1, -10.01, $3, 'transfer', NULL, now())",
    )
    .bind(a)
    .bind(Uuid::new_v4())
    .bind(b)
    .execute(&t.pool)
    .await
    .unwrap();
    let (r5, e5) = movement(5, 100);
    let mut tx = t.pool.begin().await.unwrap();
    let refused = statements::apply_remembering(&mut tx, &[(&r5, &e5)], &memory, point(3), saved(3)).await;
    assert!(refused.is_err(), "entry 4 is taken: the remembered numbering must collide, not skip");
    tx.rollback().await.unwrap();
    // A rebuild's swap brings tables that differ (here: entry 4) and saves
    // the checkpoint at the same point, anew: the numbering comes from the table.
    let mut tx = t.pool.begin().await.unwrap();
    let applied = statements::apply_remembering(&mut tx, &[(&r5, &e5)], &memory, point(3), saved(4)).await.unwrap();
    tx.commit().await.unwrap();
    memory.committed(point(5), saved(5), applied);
    assert_eq!(a_entries().await.last(), Some(&(5, d(-1101))));
    t.cleanup().await;
}
