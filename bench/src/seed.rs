//! `--seed-log N`: appends N events straight to the log of a migrated
//! database, for the replay benchmark. The events are the ledger's own,
//! decided by the domain's deciders and appended by the event store (with
//! their MACs, under `LEDGER_SECRET_KEY` or the development key), so a replay
//! reads exactly what a server would have written.

use ledger_commands::store::{self, account_stream, transfer_stream, EventMac, EventMetadata, StreamAppend};
use ledger_domain::account::{self, system_account_id, AccountCommand, AccountState, MoveMoney};
use ledger_domain::events::TransferKind;
use ledger_domain::money::Amount;
use ledger_domain::Currency;
use rand::Rng;
use sqlx::PgPool;
use std::time::Instant;
use uuid::Uuid;

const DEV_SECRET_KEY: &str = "ledger-development-sealing-key-do-not-use-in-production";
const ACCOUNTS: usize = 1_000;
const PER_TRANSACTION: usize = 5_000;

pub async fn seed(pool: &PgPool, events: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let key = std::env::var("LEDGER_SECRET_KEY").unwrap_or_else(|_| DEV_SECRET_KEY.into());
    let mac = EventMac::new(key.as_bytes());
    let currency = Currency::from_code("EUR").ok_or_else(|| anyhow::anyhow!("EUR is a currency"))?;
    let owner = Uuid::now_v7();
    let amount = |s: &str| Amount::parse("amount", s).map_err(|e| anyhow::anyhow!("{e}"));
    let mut pending: Vec<StreamAppend> = Vec::new();
    let mut written: u64 = 0;
    // The currency's system account funds the deposits.
    let mut system = AccountState::default();
    let opened =
        account::decide(&system, AccountCommand::OpenSystem { currency }).map_err(|e| anyhow::anyhow!("{e}"))?;
    system = opened.iter().fold(system, account::evolve);
    pending.push(StreamAppend {
        stream_id: account_stream(system_account_id(currency)),
        expected_version: 0,
        events: opened,
    });
    let mut accounts: Vec<(Uuid, AccountState, i64)> = Vec::with_capacity(ACCOUNTS);
    for _ in 0..ACCOUNTS {
        let id = Uuid::now_v7();
        let events = account::decide(
            &AccountState::default(),
            AccountCommand::Open { account_id: id, owner_id: owner, currency: "EUR".into(), name: None },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut state = events.iter().fold(AccountState::default(), account::evolve);
        pending.push(StreamAppend { stream_id: account_stream(id), expected_version: 0, events });
        let transfer_id = Uuid::now_v7();
        let deposit = account::decide_transfer(
            &system,
            &state,
            MoveMoney {
                transfer_id,
                kind: TransferKind::Deposit,
                initiated_by: owner,
                from_account: system_account_id(currency),
                to_account: id,
                amount: amount("1000000.00")?,
                reference: None,
                fee: None,
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        state = deposit.iter().fold(state, account::evolve);
        pending.push(StreamAppend { stream_id: transfer_stream(transfer_id), expected_version: 0, events: deposit });
        accounts.push((id, state, 1));
    }
    let mut rng = rand::thread_rng();
    let mut queued: u64 = pending.iter().map(|a| a.events.len() as u64).sum();
    while written + queued < events {
        let a = rng.gen_range(0..ACCOUNTS);
        let b = (a + 1 + rng.gen_range(0..ACCOUNTS - 1)) % ACCOUNTS;
        let (from_id, from_state, version) = &accounts[a];
        let to_state = &accounts[b].1;
        let moved = account::decide_transfer(
            from_state,
            to_state,
            MoveMoney {
                transfer_id: Uuid::now_v7(),
                kind: TransferKind::Transfer,
                initiated_by: owner,
                from_account: *from_id,
                to_account: accounts[b].0,
                amount: amount("0.01")?,
                reference: Some("replay bench".into()),
                fee: None,
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        pending.push(StreamAppend {
            stream_id: account_stream(*from_id),
            expected_version: *version,
            events: moved.clone(),
        });
        queued += moved.len() as u64;
        for i in [a, b] {
            let (_, state, _) = &mut accounts[i];
            *state = moved.iter().fold(std::mem::take(state), account::evolve);
        }
        accounts[a].2 += moved.len() as i64;
        if queued as usize >= PER_TRANSACTION {
            written += flush(pool, &mut pending, &mac, owner).await?;
            queued = 0;
            if written % 100_000 < PER_TRANSACTION as u64 {
                println!("seeded {written} events");
            }
        }
    }
    written += flush(pool, &mut pending, &mac, owner).await?;
    println!("seeded {written} events in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn flush(pool: &PgPool, pending: &mut Vec<StreamAppend>, mac: &EventMac, actor: Uuid) -> anyhow::Result<u64> {
    let metadata = EventMetadata {
        command_id: Some(Uuid::now_v7()),
        correlation_id: None,
        causation_id: None,
        actor_id: Some(actor),
        recorded_at: chrono::Utc::now(),
        client_ip: None,
        user_agent: None,
    };
    let batch: Vec<(&StreamAppend, &EventMetadata)> = pending.iter().map(|a| (a, &metadata)).collect();
    let mut tx = pool.begin().await?;
    let n = store::append_many(&mut tx, &batch, mac).await?.len() as u64;
    tx.commit().await?;
    pending.clear();
    Ok(n)
}
