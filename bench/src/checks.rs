//! The checks after every scenario: money is conserved per currency, no user
//! balance is below zero, and the balances read model equals a fold of the log.

use anyhow::Context;
use ledger_commands::store::{self, LogPoint};
use ledger_domain::events::AccountKind;
use ledger_domain::FoldedBalance;
use rust_decimal::Decimal;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct CheckResult {
    pub events: u64,
    /// Currencies whose balances do not sum to zero, with the sum.
    pub unbalanced: Vec<(String, Decimal)>,
    pub negative_user_balances: usize,
    /// Accounts whose read-model balance differs from the fold of the log.
    pub read_model_mismatches: usize,
    /// How long the read side took to reach the log's head after the load.
    pub settle: Duration,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.unbalanced.is_empty() && self.negative_user_balances == 0 && self.read_model_mismatches == 0
    }
}

pub async fn run(pool: &PgPool) -> anyhow::Result<CheckResult> {
    let started = Instant::now();
    let head: Option<i64> =
        sqlx::query_scalar("SELECT position FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    if let Some(head) = head {
        ledger_projections::read_side::wait_for(pool, head, Duration::from_secs(120))
            .await
            .context("the read side did not reach the log's head within 120 s")?;
    }
    let settle = started.elapsed();
    let mut folded: BTreeMap<Uuid, FoldedBalance> = BTreeMap::new();
    let mut after = LogPoint::START;
    let mut events = 0u64;
    let mut conn = pool.acquire().await?;
    loop {
        let page = store::read_settled_after(&mut conn, after, 20_000).await?;
        let Some(last) = page.last() else { break };
        after = last.point();
        for recorded in &page {
            ledger_domain::fold_balance(&mut folded, &recorded.decode()?);
        }
        events += page.len() as u64;
    }
    let unbalanced = ledger_domain::sums_per_currency(&folded).into_iter().filter(|(_, sum)| !sum.is_zero()).collect();
    let negative_user_balances =
        folded.values().filter(|b| b.kind == AccountKind::User && b.balance < Decimal::ZERO).count();
    let read = ledger_projections::balances::all(&mut conn).await?;
    let mut read_model_mismatches = read
        .iter()
        .filter(|r| folded.get(&r.account_id).is_none_or(|f| f.balance != r.balance || f.currency != r.currency))
        .count();
    read_model_mismatches += folded.len().saturating_sub(read.len());
    Ok(CheckResult { events, unbalanced, negative_user_balances, read_model_mismatches, settle })
}
