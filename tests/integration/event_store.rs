use crate::harness::TestLedger;
use ledger_commands::store::{self, LogPoint};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test]
async fn the_log_refuses_update_delete_and_truncate() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    t.account(&ann, "USD").await;
    for sql in ["UPDATE events SET payload = '{}'", "DELETE FROM events", "TRUNCATE events"] {
        let err = sqlx::query(sql).execute(&t.pool).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    // Versions are unique per stream: a second writer of the same version loses.
    let stream: String = sqlx::query_scalar("SELECT stream_id FROM events WHERE event_type = 'AccountOpened' LIMIT 1")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    let dup = sqlx::query("INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload) VALUES ($1, $2, 1, 'AccountOpened', 1, '{}')")
        .bind(Uuid::new_v4())
        .bind(&stream)
        .execute(&t.pool)
        .await
        .expect_err("duplicate version");
    assert!(store::is_unique_violation(&dup));
    // Every event carries its metadata.
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE command_id IS NULL OR actor_id IS NULL OR correlation_id IS NULL",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(missing, 0);
    t.cleanup().await;
}

/// An append that commits after a later one must not be skipped by the
/// tailing reader, the relay or the projectors.
#[tokio::test]
async fn tailing_does_not_skip_an_append_that_commits_late() {
    let t = TestLedger::start_with(|c| c.read_wait = Duration::from_millis(1500)).await;
    let (ann_id, ann) = t.user().await;
    let a = t.account(&ann, "USD").await;
    t.settle().await;

    // Hold an append open: it takes a position now but commits last.
    let mut held = t.pool.begin().await.unwrap();
    let stray = Uuid::now_v7();
    let held_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, command_id, correlation_id, actor_id)
         VALUES ($1, $2, 1, 'AccountOpened', 1, $3, $1, $1, $4) RETURNING position",
    )
    .bind(Uuid::now_v7())
    .bind(format!("account-{stray}"))
    .bind(json!({"account_id": stray, "owner_id": ann_id, "currency": "USD", "kind": "user", "name": "late"}))
    .bind(Uuid::parse_str(&ann_id).unwrap())
    .fetch_one(&mut *held)
    .await
    .unwrap();

    // A later append commits first, with a higher position.
    let later = t.deposit(&ann, &a, "5.00").await;
    assert!(later > held_position);

    // Nobody reads past the open transaction: not the log reader...
    let mut conn = t.pool.acquire().await.unwrap();
    let visible = store::read_settled_after(&mut conn, LogPoint::START, 10_000).await.unwrap();
    assert!(visible.iter().all(|e| e.position != later), "the later event must wait for the held one");
    // ...nor the read side, which would otherwise have skipped the held event forever.
    let (s, v) = t.get(&format!("/v1/accounts/{a}?min_position={later}"), &ann).await;
    assert_eq!((s, v["type"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("/problems/projection-lag")));

    held.commit().await.unwrap();
    assert_eq!(t.balance(&ann, &a, later).await, "5.00");
    let (s, v) = t.get(&format!("/v1/accounts/{stray}?min_position={held_position}"), &ann).await;
    assert_eq!(s, StatusCode::OK, "the late append reached the read side: {v}");
    assert_eq!(v["name"], "late");
    // In tailing order the held event comes first: it belongs to the older transaction.
    let log = t.log().await;
    let order: Vec<i64> = log.iter().map(|e| e.position).filter(|p| *p == held_position || *p == later).collect();
    assert_eq!(order, vec![held_position, later]);
    t.assert_invariants().await;
    t.cleanup().await;
}

/// Tailing order is numeric on the transaction id. A query that selects
/// `transaction_id::text AS transaction_id` and orders by the bare name sorts
/// by the text ("10" < "100" < "9"), which reorders, and with a page limit
/// skips, events wherever transaction ids gain a digit.
#[tokio::test]
async fn tailing_orders_transaction_ids_as_numbers_not_text() {
    let t = TestLedger::start_with(|c| c.read_wait = Duration::from_millis(500)).await;
    let mut conn = t.pool.acquire().await.expect("conn");
    for xid in ["100", "9", "10"] {
        sqlx::query(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, transaction_id)
             VALUES ($1, $2, 1, 'Probe', 1, '{}', $3::text::xid8)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(format!("probe-{xid}"))
        .bind(xid)
        .execute(&mut *conn)
        .await
        .expect("probe row");
    }
    let page = ledger_commands::store::read_settled_after(&mut conn, ledger_commands::store::LogPoint::START, 2)
        .await
        .expect("read");
    let xids: Vec<u64> = page.iter().map(|e| e.transaction_id).collect();
    assert_eq!(xids, vec![9, 10]);
    let next = ledger_commands::store::read_settled_after(&mut conn, page[1].point(), 10).await.expect("read");
    assert_eq!(next.first().map(|e| e.transaction_id), Some(100), "nothing skipped after the page");
    drop(conn);
    t.cleanup().await;
}
