//! The audit trail: exports that verify offline and fail on any tampering,
//! the database's own chain, and the admin HTTP export.

use crate::harness::{FundedPair, TestLedger};
use ledger_audit::chain::{verify_db, ChainBreak};
use ledger_audit::export::{self, Filter, Format};
use ledger_audit::verify::{verify, VerifyError};
use ledger_domain::events::Role;
use reqwest::StatusCode;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// A small ledger with movements, and a sealed chain.
async fn populated() -> (TestLedger, String) {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: b } = t.funded_pair("USD", "100.00").await;
    for amount in ["1.00", "2.50", "3.25"] {
        let (s, v) = t.post("/v1/transfers", &ann, json!({"from_account": a, "to_account": b, "amount": amount})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    // The sealer covers the log within moments.
    for _ in 0..100 {
        let (events, sealed): (i64, i64) =
            sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM event_chain)")
                .fetch_one(&t.pool)
                .await
                .unwrap();
        if events == sealed {
            return (t, a);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the chain sealer did not catch up");
}

/// Whether the service's sealer links the event at `position` within 30 s
/// (an event is settled only once every older transaction of the server's
/// databases, other tests' among them, has ended).
async fn sealed(t: &TestLedger, position: i64) -> bool {
    for _ in 0..1200 {
        let sealed: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_chain WHERE position = $1)")
            .bind(position)
            .fetch_one(&t.pool)
            .await
            .unwrap();
        if sealed {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn export_text(t: &TestLedger, filter: &Filter, format: Format) -> String {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let pool = t.pool.clone();
    let filter = filter.clone();
    let ledger = ledger::ledger_for(&t.config, pool.clone());
    let task = tokio::spawn(async move { export::export(&pool, &filter, format, tx, Some(&ledger)).await });
    let mut out = String::new();
    while let Some(line) = rx.recv().await {
        out.push_str(&line);
    }
    task.await.unwrap().expect("export");
    out
}

fn check(text: &str) -> Result<ledger_audit::verify::Verified, VerifyError> {
    verify(std::io::Cursor::new(text.as_bytes()))
}

fn first_bad_line(text: &str) -> u64 {
    match check(text) {
        Err(VerifyError::Record { line, .. }) => line,
        other => panic!("expected a bad record, got {other:?}"),
    }
}

#[tokio::test]
async fn an_export_verifies_and_any_tampering_names_the_first_bad_record() {
    let (t, _) = populated().await;
    let text = export_text(&t, &Filter::default(), Format::Jsonl).await;
    let verified = check(&text).expect("a fresh export verifies");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(verified.count as usize, lines.len() - 1);
    let anchor = verified.chain_anchor.expect("the manifest carries the ledger's chain anchor");
    let last: String =
        sqlx::query_scalar("SELECT hash FROM event_chain ORDER BY transaction_id DESC, position DESC LIMIT 1")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(anchor["hash"], last.as_str(), "a full export ends on the database's own chain");

    let join = |ls: Vec<&str>| ls.join("\n") + "\n";
    // Changed: an amount edited on the first line that carries one.
    let at = lines.iter().position(|l| l.contains("\"amount\":\"")).expect("a movement");
    let mut changed = lines.clone();
    let edited = lines[at].replacen("\"amount\":\"", "\"amount\":\"9", 1);
    changed[at] = &edited;
    assert_eq!(first_bad_line(&join(changed)), at as u64 + 1);
    // Removed: line 4 dropped.
    let mut removed = lines.clone();
    removed.remove(3);
    assert_eq!(first_bad_line(&join(removed)), 4);
    // Reordered: lines 3 and 4 swapped.
    let mut reordered = lines.clone();
    reordered.swap(2, 3);
    assert_eq!(first_bad_line(&join(reordered)), 3);
    // Inserted: line 2 repeated after itself.
    let mut inserted = lines.clone();
    inserted.insert(2, lines[1]);
    assert_eq!(first_bad_line(&join(inserted)), 3);
    // Cut short: no manifest.
    let cut = join(lines[..lines.len() - 1].to_vec());
    assert!(matches!(check(&cut), Err(VerifyError::Manifest(_))));
    // A manifest that lies about the count.
    let lying =
        text.replacen(&format!("\"count\":{}", verified.count), &format!("\"count\":{}", verified.count + 1), 1);
    assert!(matches!(check(&lying), Err(VerifyError::Manifest(_))));

    // Cut short with the manifest rewritten to match: the anchor still names the real last event.
    let n = lines.len();
    let mut shortened: Vec<String> = lines[..n - 2].iter().map(|l| l.to_string()).collect();
    let prefix = check(&(shortened.join("\n") + "\n" + lines[n - 1] + "\n"));
    assert!(prefix.is_err(), "the old manifest does not fit a shorter file");
    let mut manifest: serde_json::Value = serde_json::from_str(lines[n - 1]).unwrap();
    let kept = check(
        &(shortened.join("\n")
            + "\n"
            + &ledger_domain::canonical::to_string(&json!({"manifest": {"count": 0}}))
            + "\n"),
    )
    .err();
    assert!(kept.is_some());
    let short_last = serde_json::from_str::<serde_json::Value>(&shortened[shortened.len() - 1]).unwrap();
    manifest["manifest"]["count"] = json!(verified.count - 1);
    manifest["manifest"]["last_position"] = short_last["event"]["position"].clone();
    manifest["manifest"]["final_hash"] = short_last["hash"].clone();
    shortened.push(ledger_domain::canonical::to_string(&manifest));
    assert!(
        matches!(check(&(shortened.join("\n") + "\n")), Err(VerifyError::Manifest(m)) if m.contains("chain_anchor")),
        "a truncated file with a forged manifest fails on its anchor"
    );
    // Lines another reader could read differently are refused.
    let duplicate_key = lines[at].replacen("\"amount\":\"", "\"amount\":\"2500.00\",\"amount\":\"", 1);
    let mut dup = lines.clone();
    dup[at] = &duplicate_key;
    assert_eq!(first_bad_line(&join(dup)), at as u64 + 1);
    let extra = lines[1].replacen("{\"event\"", "{\"approved_by\":\"CFO\",\"event\"", 1);
    let mut with_extra = lines.clone();
    with_extra[1] = &extra;
    assert_eq!(first_bad_line(&join(with_extra)), 2);
    let mut blank = lines.clone();
    blank.insert(2, "");
    assert_eq!(first_bad_line(&join(blank)), 3);

    // CSV: the same chain, a fixed column set.
    let csv = export_text(&t, &Filter::default(), Format::Csv).await;
    assert!(csv.starts_with("position,recorded_at,event_type,schema_version,stream_id,stream_version,event_id,"));
    assert!(csv.lines().next().unwrap().ends_with(",payload,hash,personal"));
    let csv_verified = check(&csv).expect("a CSV export verifies");
    assert_eq!(csv_verified.final_hash, verified.final_hash, "both formats chain the same records");
    let tampered = csv.replacen(",2.50,", ",2.51,", 1).replacen("\"\"2.50\"\"", "\"\"2.51\"\"", 1);
    assert!(check(&tampered).is_err());
    t.cleanup().await;
}

#[tokio::test]
async fn a_filtered_export_through_the_cli_verifies_and_exits_non_zero_when_tampered() {
    let (t, a) = populated().await;
    let dir = std::env::temp_dir().join(format!("ledger-audit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("account.jsonl");
    let ledger = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(args)
            .env("LEDGER_DATABASE_URL", &t.config.database_url)
            .env("LEDGER_SECRET_KEY", String::from_utf8(t.config.secret_key.clone()).unwrap())
            .env("LEDGER_LOG", "warn")
            .output()
            .expect("ledger runs")
    };
    let out = ledger(&["audit", "export", "--account", &a, "--format", "jsonl", "--output", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&file).unwrap();
    let verified = check(&text).unwrap();
    assert_eq!(verified.count, 5, "the account's opening, its deposit and three transfers");
    let out = ledger(&["audit", "verify", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&file, text.replacen("\"3.25\"", "\"0.25\"", 1)).unwrap();
    let out = ledger(&["audit", "verify", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 5"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ledger(&["audit", "verify", "--db"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The untampered file's anchor is the database's own link.
    std::fs::write(&file, &text).unwrap();
    let out = ledger(&["audit", "verify", file.to_str().unwrap(), "--db"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("anchor matches"));
    std::fs::remove_dir_all(&dir).unwrap();
    t.cleanup().await;
}

#[tokio::test]
async fn the_database_chain_finds_a_row_a_superuser_edited_or_deleted() {
    let (t, _) = populated().await;
    let clean =
        verify_db(&t.pool, Some(&ledger_commands::store::EventMac::new(&t.config.secret_key)), |_| {}).await.unwrap();
    assert_eq!(clean.first_break, None);
    assert!(clean.sealed >= 8);
    let target: i64 = sqlx::query_scalar(
        "SELECT position FROM events WHERE event_type = 'TransferRecorded' AND payload->>'amount' = '2.50'",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    // A superuser gets past the append-only trigger, edits, and puts it back.
    let mut tx = t.pool.begin().await.unwrap();
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER events_append_only_rows",
        "UPDATE events SET payload = jsonb_set(payload, '{amount}', '\"25.00\"') WHERE position = $1",
        "ALTER TABLE events ENABLE TRIGGER events_append_only_rows",
    ] {
        sqlx::query(sql).bind(target).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let found =
        verify_db(&t.pool, Some(&ledger_commands::store::EventMac::new(&t.config.secret_key)), |_| {}).await.unwrap();
    assert_eq!(found.first_break, Some(ChainBreak::Unauthenticated { position: target }), "the MAC catches it first");
    let chain_only = verify_db(&t.pool, None, |_| {}).await.unwrap();
    assert_eq!(chain_only.first_break, Some(ChainBreak::Altered { position: target }), "and so does the chain");

    let first: i64 = sqlx::query_scalar("SELECT min(position) FROM events").fetch_one(&t.pool).await.unwrap();
    let mut tx = t.pool.begin().await.unwrap();
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER events_append_only_rows",
        "DELETE FROM events WHERE position = $1",
        "ALTER TABLE events ENABLE TRIGGER events_append_only_rows",
    ] {
        sqlx::query(sql).bind(first).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let found =
        verify_db(&t.pool, Some(&ledger_commands::store::EventMac::new(&t.config.secret_key)), |_| {}).await.unwrap();
    assert_eq!(found.first_break, Some(ChainBreak::Missing { position: first }), "the earliest break is reported");
    t.cleanup().await;
}

#[tokio::test]
async fn a_row_a_superuser_inserts_at_the_head_carries_no_valid_mac() {
    let (t, a) = populated().await;
    let mac = ledger_commands::store::EventMac::new(&t.config.secret_key);
    assert_eq!(verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap().first_break, None);
    // A forged credit, inserted directly (the trigger allows inserts); the sealer seals it like any event.
    let forged: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, command_id, correlation_id, actor_id)
         VALUES (gen_random_uuid(), 'transfer-' || gen_random_uuid(), 1, 'TransferRecorded', 3,
                 jsonb_build_object('transfer_id', gen_random_uuid(), 'from_account', gen_random_uuid(), 'to_account', $1::text,
                                    'amount', '5000.00', 'currency', 'USD', 'kind', 'deposit', 'reference', null, 'channel', 'api'),
                 gen_random_uuid(), gen_random_uuid(), gen_random_uuid())
         RETURNING position",
    )
    .bind(&a)
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert!(sealed(&t, forged).await);
    let without_key = verify_db(&t.pool, None, |_| {}).await.unwrap();
    assert_eq!(without_key.first_break, None, "the chain alone cannot tell: the sealer sealed it");
    let with_key = verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap();
    assert_eq!(with_key.first_break, Some(ChainBreak::Unauthenticated { position: forged }));
    t.cleanup().await;
}

/// A forger's row whose payload is valid jsonb but no JSON tree (nested
/// deeper than the MAC's parser goes) and whose MAC is empty: it has no MAC
/// to match, so it is unauthenticated, not "equal to the empty MAC". Nor
/// does it stop the chain: the sealer links it by its stored text and goes
/// on, and an export through it verifies (it stopped both once).
#[tokio::test]
async fn a_row_whose_payload_cannot_be_parsed_carries_no_valid_mac() {
    let (t, _) = populated().await;
    let mac = ledger_commands::store::EventMac::new(&t.config.secret_key);
    assert_eq!(verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap().first_break, None);
    // A payload `levels` deep: 200 is past the parser's limit; 127 is at it,
    // a tree for the chain, and two levels deeper on its export's line.
    let forge = |levels: usize| {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, command_id,
                                 correlation_id, actor_id, mac)
             VALUES (gen_random_uuid(), 'transfer-' || gen_random_uuid(), 1, 'TransferRecorded', 3,
                     ('{\"deep\": ' || repeat('[', $1) || repeat(']', $1) || '}')::jsonb,
                     gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '')
             RETURNING position",
        )
        .bind(levels as i32 - 1)
        .fetch_one(&t.pool)
    };
    let forged = forge(201).await.unwrap();
    let found = verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap();
    assert_eq!(found.first_break, Some(ChainBreak::Unauthenticated { position: forged }));
    forge(127).await.unwrap();

    // The ledger appends after it; the sealer links both.
    let after = open_accounts(&t, &mac, &["after the forged row"]).await[0];
    assert!(sealed(&t, after).await, "the sealer went on past the forged row");
    let chain_only = verify_db(&t.pool, None, |_| {}).await.unwrap();
    assert_eq!((chain_only.first_break, chain_only.unsealed), (None, 0), "sealed as it is, like any insert");
    let found = verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap();
    assert_eq!(found.first_break, Some(ChainBreak::Unauthenticated { position: forged }), "the MAC still tells");
    for format in [Format::Jsonl, Format::Csv] {
        let text = export_text(&t, &Filter::default(), format).await;
        let verified = check(&text).expect("an export through the forged row verifies");
        assert_eq!(verified.last_position, Some(after));
    }
    t.cleanup().await;
}

#[tokio::test]
async fn staff_stream_the_export_over_http_and_users_cannot() {
    let (t, _) = populated().await;
    let support = t.person_with_role(Role::Support).await;
    let (_, user) = t.user().await;
    let response = t
        .http
        .get(format!("{}/v1/admin/audit/export?type=TransferRecorded&format=jsonl", t.base))
        .bearer_auth(&support.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let verified = check(&text).expect("the HTTP export verifies");
    assert_eq!(verified.count, 4, "the deposit and three transfers");
    let (s, _) = t.get("/v1/admin/audit/export", &user).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = t.get("/v1/admin/audit/export?from=yesterday", &support.token).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = t.get("/v1/admin/audit/export?type=%00", &support.token).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    t.cleanup().await;
}

/// Opens `names.len()` accounts in one transaction, authenticated by `mac`;
/// returns their positions.
async fn open_accounts(t: &TestLedger, mac: &ledger_commands::store::EventMac, names: &[&str]) -> Vec<i64> {
    use ledger_commands::store::{self, account_stream, EventMetadata, StreamAppend};
    use ledger_domain::events::{AccountKind, AccountOpened};
    use ledger_domain::Event;
    let appends: Vec<StreamAppend> = names
        .iter()
        .map(|name| {
            let account_id = uuid::Uuid::now_v7();
            StreamAppend {
                stream_id: account_stream(account_id),
                expected_version: 0,
                events: vec![Event::AccountOpened(AccountOpened {
                    account_id,
                    owner_id: Some(uuid::Uuid::now_v7()),
                    currency: "EUR".into(),
                    kind: AccountKind::User,
                    name: Some((*name).into()),
                })],
            }
        })
        .collect();
    // Metadata with every kind of field, escapes and all.
    let metadata = EventMetadata {
        command_id: Some(uuid::Uuid::now_v7()),
        actor_id: Some(uuid::Uuid::now_v7()),
        recorded_at: chrono::Utc::now(),
        client_ip: Some("203.0.113.7".into()),
        user_agent: Some("agent \"quoted\" \\ \u{1} é".into()),
        ..Default::default()
    };
    let batch: Vec<(&StreamAppend, &EventMetadata)> = appends.iter().map(|a| (a, &metadata)).collect();
    let mut tx = t.pool.begin().await.unwrap();
    let positions = store::append_many(&mut tx, &batch, mac).await.unwrap();
    tx.commit().await.unwrap();
    positions
}

/// Seals `events` events, batch after batch: an event is settled only once
/// every transaction older than its own has ended, in any database of the
/// server (other tests' among them).
async fn seal(
    t: &TestLedger,
    forms: &ledger_commands::unsealed::UnsealedForms,
    events: usize,
) -> ledger_audit::chain::Sealed {
    let mut sum = ledger_audit::chain::Sealed::default();
    for _ in 0..1200 {
        let mut conn = t.pool.acquire().await.unwrap();
        let sealed = ledger_audit::chain::seal_batch(&mut conn, Some(forms)).await.unwrap();
        sum.linked += sealed.linked;
        sum.read_back += sealed.read_back;
        if sum.linked >= events {
            return sum;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} of {events} events sealed", sum.linked);
}

/// The sealer links what this process appended from the canonical forms
/// kept at the append, and reads back whole only the rows it has no form
/// of (another instance's, or written out of band): the chain equals what
/// reading every row back gives. An event altered between its commit and
/// its sealing is sealed as it was appended, so the chain alone finds it.
#[tokio::test]
async fn the_sealer_links_its_own_appends_from_memory_and_reads_back_the_rest() {
    use ledger::config::Roles;
    use ledger_audit::chain::Sealed;
    use ledger_commands::store::EventMac;
    use ledger_commands::unsealed::UnsealedForms;
    use std::sync::Arc;

    // No relay role: no sealer of the service's own runs beside this one.
    let t = TestLedger::start_with_roles(|_| {}, Roles { relay: false, ..Roles::ALL }).await;
    let forms = Arc::new(UnsealedForms::default());
    let here = EventMac::new(&t.config.secret_key).keeping_forms_in(forms.clone());
    let elsewhere = EventMac::new(&t.config.secret_key);
    let mac = EventMac::new(&t.config.secret_key);
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&t.pool).await.unwrap();

    // Appended before a sealer leads here: kept nowhere.
    open_accounts(&t, &here, &["before"]).await;
    forms.start_keeping();
    open_accounts(&t, &here, &["a", "b", "c ☃"]).await;
    open_accounts(&t, &elsewhere, &["d", "e"]).await;
    open_accounts(&t, &here, &["f", "g"]).await;
    assert_eq!(forms.len(), 5);
    let others = before as usize + 1 + 2;
    assert_eq!(seal(&t, &forms, others + 5).await, Sealed { linked: others + 5, read_back: others });
    assert!(forms.is_empty(), "the forms are taken as they are linked");
    let verified = verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap();
    assert_eq!((verified.first_break, verified.sealed, verified.unsealed), (None, others as u64 + 5, 0));

    // Altered between its commit and its sealing.
    let positions = open_accounts(&t, &here, &["h", "i"]).await;
    let mut tx = t.pool.begin().await.unwrap();
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER events_append_only_rows",
        "UPDATE events SET payload = jsonb_set(payload, '{name}', '\"mallory\"') WHERE position = $1",
        "ALTER TABLE events ENABLE TRIGGER events_append_only_rows",
    ] {
        sqlx::query(sql).bind(positions[1]).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(seal(&t, &forms, 2).await, Sealed { linked: 2, read_back: 0 });
    let chain_only = verify_db(&t.pool, None, |_| {}).await.unwrap();
    assert_eq!(chain_only.first_break, Some(ChainBreak::Altered { position: positions[1] }));
    let with_key = verify_db(&t.pool, Some(&mac), |_| {}).await.unwrap();
    assert_eq!(with_key.first_break, Some(ChainBreak::Unauthenticated { position: positions[1] }));
    // A whole-log export hashes the row as it is now: its end no longer
    // meets the database's chain.
    let text = export_text(&t, &Filter::default(), Format::Jsonl).await;
    assert!(matches!(check(&text), Err(VerifyError::Manifest(m)) if m.contains("chain_anchor")));
    t.cleanup().await;
}

/// An idle sealer holds no transaction open between its looks at the log:
/// one left open would hold its locks on `events` (a migration's
/// `ALTER TABLE` would queue behind it, and every statement behind that).
#[tokio::test]
async fn an_idle_sealer_leaves_no_transaction_open() {
    let (t, _) = populated().await;
    let mut open = 0;
    for _ in 0..20 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'idle in transaction'
               AND query LIKE '%event_id FROM events%'",
        )
        .fetch_one(&t.pool)
        .await
        .unwrap();
        open += n;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open <= 2, "the sealer was seen idle in a transaction in {open} of 20 looks");
    t.cleanup().await;
}
