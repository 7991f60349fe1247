//! A projector's batch of movements in one statement (`movement_run`),
//! against the per-read-model path: the same rows, byte for byte.

use crate::harness::{FundedPair, TestLedger};
use ledger_commands::store::{EventMetadata, Payload, RecordedEvent};
use ledger_domain::events::{Channel, TransferKind, TransferRecorded};
use ledger_domain::Event;
use ledger_projections::movement_run::{self, Outcome};
use ledger_projections::statements::{self, LastEntries};
use ledger_projections::{balances, checkpoint, Projection};
use rust_decimal::Decimal;
use uuid::Uuid;

const PROJECTIONS: [&str; 2] = ["balances", "statements"];

fn movement(position: i64, from: Uuid, to: Uuid, cents: i64, kind: TransferKind) -> (RecordedEvent, Event) {
    let t = TransferRecorded {
        // Derived from the position: both databases get the same rows.
        transfer_id: Uuid::from_u128(0x7000 + position as u128),
        from_account: from,
        to_account: to,
        amount: Decimal::new(cents, 2),
        currency: "EUR".into(),
        kind,
        reference: (position % 2 == 0).then(|| format!("order {position}")),
        channel: Channel::Api,
    };
    let recorded = RecordedEvent {
        position,
        transaction_id: 100 + position as u64,
        event_id: Uuid::from_u128(0x9000 + position as u128),
        stream_id: format!("account-{from}"),
        stream_version: position,
        event_type: "TransferRecorded".into(),
        schema_version: 1,
        payload: Payload::of(&serde_json::to_value(&t).expect("json")),
        metadata: EventMetadata {
            recorded_at: chrono::DateTime::from_timestamp(1_800_000_000 + position, 0).expect("time"),
            ..Default::default()
        },
    };
    (recorded, Event::TransferRecorded(t))
}

fn movements(batch: &[(RecordedEvent, Event)]) -> Vec<(&RecordedEvent, &TransferRecorded)> {
    batch
        .iter()
        .map(|(r, e)| match e {
            Event::TransferRecorded(t) => (r, t),
            other => panic!("not a movement: {other:?}"),
        })
        .collect()
}

async fn open(t: &TestLedger, accounts: &[Uuid]) {
    for account in accounts {
        sqlx::query(
            "INSERT INTO balances (account_id, owner_id, currency, kind, name, balance, available, version,
                                   last_position, opened_at)
             VALUES ($1, NULL, 'EUR', 'user', NULL, 0, 0, 0, 0, to_timestamp(1800000000))",
        )
        .bind(account)
        .execute(&t.pool)
        .await
        .expect("opened");
    }
}

/// How `project` applies batches.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// Each read model its own statements.
    PerReadModel,
    /// In one statement, the accounts the memory lacks looked up first.
    OneStatement,
}

/// Applies the batches as a projector does, each in a transaction that
/// locks and moves both checkpoints, the way `way` says; one statement
/// where the projector's own choice (`movement_run::qualify`) allows it,
/// planned as it plans (`movement_run::plan`). Returns how many batches
/// went in one statement, and the memory left.
async fn project(t: &TestLedger, batches: &[Vec<(RecordedEvent, Event)>], way: Way) -> (usize, LastEntries) {
    let both = [Projection::Balances, Projection::Statements];
    let mut memory = LastEntries::default();
    let mut in_one = 0;
    for batch in batches {
        let through = batch.last().expect("events").0.point();
        let mut tx = t.pool.begin().await.expect("begin");
        let locked = checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
        let from = locked.iter().find(|c| c.projection == "statements").expect("statements");
        let source: Vec<RecordedEvent> = batch.iter().map(|(r, _)| r.clone()).collect();
        let decoded: std::collections::HashMap<_, _> = batch.iter().map(|(r, e)| (r.point(), e.clone())).collect();
        let work: Vec<_> = both
            .iter()
            .map(|p| {
                let name = p.name();
                (*p, locked.iter().find(|c| c.projection == name).expect("locked"), source.iter().collect::<Vec<_>>())
            })
            .collect();
        let run = match way {
            Way::PerReadModel => None,
            Way::OneStatement => movement_run::qualify(&both, &work, &source, &decoded),
        };
        let (saved, applied) = match run {
            Some(run) => {
                in_one += 1;
                let planned = movement_run::plan(&mut tx, &work, &run, &memory).await.expect("planned");
                assert!(planned.is_some(), "the statements read model is planned for");
                let moved = [(Projection::Balances, through), (Projection::Statements, through)];
                match movement_run::apply(&mut tx, &run, &moved, planned).await.expect("applied") {
                    Outcome::Applied { saved, statements } => (saved, statements.expect("entries")),
                    Outcome::AlreadyListed => panic!("nothing was listed before"),
                }
            }
            None => {
                let pairs: Vec<(&RecordedEvent, &Event)> = batch.iter().map(|(r, e)| (r, e)).collect();
                balances::apply_all(&mut tx, &pairs).await.expect("balances");
                let applied = statements::apply_remembering(&mut tx, &pairs, &memory, from.at, from.written)
                    .await
                    .expect("statements");
                let saved = checkpoint::save_all(&mut tx, &[("balances", through), ("statements", through)])
                    .await
                    .expect("saved");
                (saved, applied)
            }
        };
        tx.commit().await.expect("commit");
        let written = saved.iter().find(|(name, _)| name == "statements").expect("saved").1;
        memory.committed(through, written, applied);
    }
    (in_one, memory)
}

async fn dump(t: &TestLedger) -> Vec<Vec<String>> {
    let mut tables = vec![];
    for (table, order) in [
        ("balances", "account_id"),
        ("statement_entries", "account_id, entry_no"),
        ("transfers", "transfer_id"),
        (
            "(SELECT projection, transaction_id::text, position FROM projection_checkpoints
           WHERE projection IN ('balances', 'statements'))",
            "projection",
        ),
    ] {
        tables.push(
            sqlx::query_scalar(&format!("SELECT row_to_json(r)::text FROM {table} r ORDER BY {order}"))
                .fetch_all(&t.pool)
                .await
                .expect("dump"),
        );
    }
    tables
}

#[tokio::test]
async fn a_run_of_movements_in_one_statement_writes_exactly_what_each_read_model_would() {
    let (a, b, c, d) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4));
    let batches = vec![
        // Looks a, b and c up: the memory is empty.
        vec![movement(1, a, b, 10_000, TransferKind::Deposit), movement(2, b, c, 2_500, TransferKind::Transfer)],
        // Known accounts, each touched several times, in and out.
        vec![
            movement(3, a, c, 1_001, TransferKind::Transfer),
            movement(4, c, b, 333, TransferKind::Fee),
            movement(5, b, a, 7_777, TransferKind::Refund),
            movement(6, a, b, 1, TransferKind::Transfer),
        ],
        // d is new: only its last entry is looked up.
        vec![movement(7, c, d, 900, TransferKind::Transfer)],
        // All known again.
        vec![movement(8, d, a, 450, TransferKind::Withdrawal), movement(9, a, d, 5, TransferKind::Transfer)],
        // Numbered from the memory the one statement left.
        vec![movement(10, b, d, 77, TransferKind::Transfer)],
    ];
    let per_model = TestLedger::start().await;
    let one = TestLedger::start().await;
    for t in [&per_model, &one] {
        open(t, &[a, b, c, d]).await;
    }
    assert_eq!(project(&per_model, &batches, Way::PerReadModel).await.0, 0);
    assert_eq!(project(&one, &batches, Way::OneStatement).await.0, 5, "every batch in one statement");
    let rows = dump(&one).await;
    assert_eq!(rows, dump(&per_model).await, "the same rows in every table, and the same checkpoints");
    assert_eq!(rows[1].len(), 20, "two entries per movement");
    per_model.cleanup().await;
    one.cleanup().await;
}

/// With the accounts the memory lacks looked up first, every batch goes in
/// one statement, and still writes what each read model would: after a
/// restart the second batch looks up a, b and c, which have entries, the
/// third only d; and a memory of another save of the checkpoint is not
/// trusted for any account.
#[tokio::test]
async fn accounts_the_memory_lacks_are_looked_up_and_the_run_still_goes_in_one_statement() {
    let (a, b, c, d) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4));
    let batches = [
        vec![movement(1, a, b, 10_000, TransferKind::Deposit), movement(2, b, c, 2_500, TransferKind::Transfer)],
        vec![movement(3, a, c, 1_001, TransferKind::Transfer), movement(4, c, b, 333, TransferKind::Fee)],
        vec![movement(5, c, d, 900, TransferKind::Transfer), movement(6, d, a, 450, TransferKind::Withdrawal)],
        vec![movement(7, b, d, 77, TransferKind::Transfer)],
    ];
    let per_model = TestLedger::start().await;
    let one = TestLedger::start().await;
    for t in [&per_model, &one] {
        open(t, &[a, b, c, d]).await;
    }
    project(&per_model, &batches[..3], Way::PerReadModel).await;
    // The first batch before a restart: the memory after it starts empty
    // while a, b and c have entries.
    project(&one, &batches[..1], Way::PerReadModel).await;
    let (in_one, memory) = project(&one, &batches[1..3], Way::OneStatement).await;
    assert_eq!(in_one, 2, "every batch after the restart in one statement");
    assert_eq!(dump(&one).await, dump(&per_model).await, "the same rows in every table, and the same checkpoints");

    // The last batch with a memory that is not this checkpoint's: b and d
    // are looked up, not taken from it.
    let mut memory = memory;
    let last = &batches[3];
    let through = last[0].0.point();
    let mut tx = one.pool.begin().await.expect("begin");
    let locked = checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
    let from = locked.iter().find(|c| c.projection == "statements").expect("statements");
    assert_eq!(memory.len(), 4, "the memory knows every account");
    // What it remembers for b, and for a, which the batch does not touch,
    // is made wrong by another writer's entries.
    for account in [a, b] {
        sqlx::query(
            "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                            balance_after, counterparty_account, kind, reference, recorded_at)
             SELECT account_id, entry_no + 1, 7, transfer_id, direction, 0, balance_after, counterparty_account,
                    kind, reference, recorded_at
             FROM statement_entries WHERE account_id = $1 ORDER BY entry_no DESC LIMIT 1",
        )
        .bind(account)
        .execute(&mut *tx)
        .await
        .expect("another writer's entry");
    }
    let elsewhere = from.written + chrono::Duration::seconds(1);
    let planned = statements::plan(&mut tx, &memory, from.at, elsewhere, &movements(last)).await.expect("planned");
    let moved = [(Projection::Balances, through), (Projection::Statements, through)];
    let Outcome::Applied { saved, statements: Some(applied) } =
        movement_run::apply(&mut tx, &movements(last), &moved, Some(planned)).await.expect("ran")
    else {
        panic!("nothing was listed before, and the statements moved")
    };
    let last_two = |account: Uuid| {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT entry_no, position FROM statement_entries WHERE account_id = $1 ORDER BY entry_no DESC LIMIT 2",
        )
        .bind(account)
    };
    let numbered = last_two(b).fetch_all(&mut *tx).await.expect("entries");
    assert_eq!(numbered[0].0, numbered[1].0 + 1, "numbered on from the entry the memory did not know");
    tx.commit().await.expect("commit");
    let written = saved.iter().find(|(name, _)| name == "statements").expect("saved").1;
    memory.committed(through, written, applied);
    assert_eq!(memory.len(), 2, "after a batch it did not begin with, only the batch's accounts, b and d, are kept");

    // So the next batch, this projector's own again, looks a up.
    let next = [movement(8, a, c, 5, TransferKind::Transfer)];
    let through = next[0].0.point();
    let mut tx = one.pool.begin().await.expect("begin");
    let locked = checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
    let from = locked.iter().find(|c| c.projection == "statements").expect("statements");
    let planned = statements::plan(&mut tx, &memory, from.at, from.written, &movements(&next)).await.expect("planned");
    let Outcome::Applied { .. } =
        movement_run::apply(&mut tx, &movements(&next), &moved, Some(planned)).await.expect("ran on from a's last")
    else {
        panic!("nothing was listed before")
    };
    let numbered = last_two(a).fetch_all(&mut *tx).await.expect("entries");
    assert_eq!(numbered[0], (numbered[1].0 + 1, 8), "a's entry numbered on from the other writer's");
    tx.rollback().await.expect("rollback");
    per_model.cleanup().await;
    one.cleanup().await;
}

#[tokio::test]
async fn a_movement_listed_already_sends_the_batch_back_with_nothing_written() {
    let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let t = TestLedger::start().await;
    open(&t, &[a, b]).await;
    let first = vec![movement(1, a, b, 500, TransferKind::Transfer)];
    let (_, memory) = project(&t, std::slice::from_ref(&first), Way::PerReadModel).await;
    let before = dump(&t).await;

    // Position 1's transfer again (as a rebuild's swap or a repeated event
    // could bring it), then a new one.
    let (mut again, event) = movement(1, a, b, 500, TransferKind::Transfer);
    again.position = 2;
    again.transaction_id = 102;
    let batch = vec![(again, event), movement(3, b, a, 200, TransferKind::Transfer)];
    let through = batch[1].0.point();
    let mut tx = t.pool.begin().await.expect("begin");
    let locked = checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
    let from = locked.iter().find(|c| c.projection == "statements").expect("statements");
    let planned = statements::plan(&mut tx, &memory, from.at, from.written, &movements(&batch)).await.expect("planned");
    let moved = [(Projection::Balances, through), (Projection::Statements, through)];
    let outcome = movement_run::apply(&mut tx, &movements(&batch), &moved, Some(planned)).await.expect("ran");
    assert!(matches!(outcome, Outcome::AlreadyListed), "the repeated transfer is reported");
    tx.rollback().await.expect("rollback");
    // The statements read model never moves without its entries.
    let mut tx = t.pool.begin().await.expect("begin");
    checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
    let refused = movement_run::apply(&mut tx, &movements(&batch), &moved, None).await;
    assert!(refused.is_err(), "no plan for the statements: refused");
    tx.rollback().await.expect("rollback");
    assert_eq!(dump(&t).await, before, "nothing of the batch stays");
    t.cleanup().await;
}

/// Through the projector: a movement whose transfer is listed already (the
/// log holds it twice) is applied the per-read-model way, and the read
/// models equal what a rebuild from the log writes.
#[tokio::test]
async fn the_projector_applies_a_transfer_listed_already_as_a_rebuild_does() {
    use ledger_commands::store::{self, EventMac, EventMetadata, StreamAppend};
    use serde_json::json;

    let t = TestLedger::start().await;
    let FundedPair { payer: alice, payer_account: a, payee: _, payee_account: b } =
        t.funded_pair("EUR", "100.00").await;
    let (status, _) =
        t.post("/v1/transfers", &alice, json!({"from_account": a, "to_account": b, "amount": "10.00"})).await;
    assert_eq!(status, 201);
    t.settle().await;

    // The last movement's event again, at its stream's next version: the
    // projector knows both accounts, so the batch is tried in one statement.
    let first = t.log().await.into_iter().rev().find(|e| e.event_type == "TransferRecorded").expect("a movement");
    let head: i64 = sqlx::query_scalar("SELECT max(stream_version) FROM events WHERE stream_id = $1")
        .bind(&first.stream_id)
        .fetch_one(&t.pool)
        .await
        .expect("head");
    let mut tx = t.pool.begin().await.expect("begin");
    store::append(
        &mut tx,
        &[StreamAppend {
            stream_id: first.stream_id.clone(),
            expected_version: head,
            events: vec![first.decode().expect("decodes")],
        }],
        &EventMetadata { recorded_at: chrono::Utc::now(), ..Default::default() },
        &EventMac::new(&t.config.secret_key),
    )
    .await
    .expect("appended");
    tx.commit().await.expect("commit");
    t.settle().await;
    // And the next movement goes on from there.
    let (status, _) =
        t.post("/v1/transfers", &alice, json!({"from_account": a, "to_account": b, "amount": "2.50"})).await;
    assert_eq!(status, 201);
    t.settle().await;

    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM statement_entries WHERE account_id = $1::uuid")
        .bind(&a)
        .fetch_one(&t.pool)
        .await
        .expect("entries");
    assert_eq!(entries, 3, "the deposit, the transfer once, the next transfer");
    for projection in [Projection::Balances, Projection::Statements] {
        let differences =
            ledger_projections::rebuild::compare(&t.pool, projection, &mut |_, _| {}).await.expect("compared");
        assert!(differences.is_empty(), "{}: {differences:?}", projection.name());
    }
    t.cleanup().await;
}

/// Which batches a projector tries in one statement (`movement_run::qualify`):
/// only a run of movements, no transfer twice, that every read model of the
/// projector applies whole, whether or not the statements' memory knows its
/// accounts. Everything else goes per read model.
#[tokio::test]
async fn only_a_whole_run_of_movements_qualifies_for_one_statement() {
    use ledger_domain::events::HoldPlaced;
    use std::collections::HashMap;

    let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    let t = TestLedger::start().await;
    open(&t, &[a, b, c]).await;
    // a and b have an entry each, c none.
    project(&t, &[vec![movement(1, a, b, 1_000, TransferKind::Deposit)]], Way::PerReadModel).await;

    let mut tx = t.pool.begin().await.expect("begin");
    let through = ledger_commands::store::LogPoint { transaction_id: 109, position: 9 };
    let locked = checkpoint::lock_counting(&mut tx, &PROJECTIONS, through).await.expect("locked");
    tx.rollback().await.expect("rollback");
    let at = |name: &str| locked.iter().find(|c| c.projection == name).expect("locked");
    let (balances_at, statements_at) = (at("balances"), at("statements"));
    let both = [Projection::Balances, Projection::Statements];

    // Which way `batch` goes for a projector of `projections`, each read
    // model applying the batch's events after `skip` of them.
    let choose = |projections: &[Projection], batch: &[(RecordedEvent, Event)], skip: usize| {
        let source: Vec<RecordedEvent> = batch.iter().map(|(r, _)| r.clone()).collect();
        let decoded: HashMap<_, _> = batch.iter().map(|(r, e)| (r.point(), e.clone())).collect();
        let work: Vec<_> = projections
            .iter()
            .map(|p| {
                let locked = if *p == Projection::Statements { statements_at } else { balances_at };
                (*p, locked, source.iter().skip(skip).collect::<Vec<_>>())
            })
            .collect();
        movement_run::qualify(projections, &work, &source, &decoded).map(|movements| movements.len())
    };
    let known = vec![movement(2, a, b, 100, TransferKind::Transfer), movement(3, b, a, 50, TransferKind::Transfer)];
    assert_eq!(choose(&both, &known, 0), Some(2), "movements only: one statement");
    assert_eq!(choose(&both[..1], &known, 0), Some(2), "balances alone");
    assert_eq!(choose(&Projection::ALL, &known, 0), Some(2), "every read model, as in production");
    assert_eq!(choose(&both, &known, 1), None, "a read model past part of the batch");

    let unknown = vec![movement(2, a, c, 100, TransferKind::Transfer)];
    assert_eq!(choose(&both, &unknown, 0), Some(1), "an account the memory does not know: looked up by the plan");

    let (mut again, event) = movement(2, a, b, 100, TransferKind::Transfer);
    let twice = vec![(again.clone(), event.clone()), {
        again.position = 3;
        again.transaction_id = 103;
        (again, event)
    }];
    assert_eq!(choose(&both, &twice, 0), None, "one transfer twice in the batch");

    let (mut held, _) = movement(3, a, b, 100, TransferKind::Transfer);
    held.event_type = "HoldPlaced".into();
    let hold = Event::HoldPlaced(HoldPlaced {
        hold_id: Uuid::from_u128(0x4000),
        from_account: a,
        to_account: b,
        amount: Decimal::new(100, 2),
        currency: "EUR".into(),
        expires_at: chrono::DateTime::from_timestamp(1_900_000_000, 0).expect("time"),
        reference: None,
        order_id: None,
    });
    let mixed = vec![movement(2, a, b, 100, TransferKind::Transfer), (held, hold)];
    assert_eq!(choose(&both, &mixed, 0), None, "a hold among the movements");

    // A projector with a read model that has nothing of this batch to
    // apply (its work is missing): per read model.
    let source: Vec<RecordedEvent> = known.iter().map(|(r, _)| r.clone()).collect();
    let decoded: HashMap<_, _> = known.iter().map(|(r, e)| (r.point(), e.clone())).collect();
    let work = vec![(Projection::Balances, balances_at, source.iter().collect::<Vec<_>>())];
    assert!(
        movement_run::qualify(&both, &work, &source, &decoded).is_none(),
        "the statements read model is past the batch"
    );
    t.cleanup().await;
}
