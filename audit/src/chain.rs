//! The database's own hash chain over the log (`event_chain`), written by a
//! sealer that follows the log in tailing order, and its verification.
//!
//! What it proves: a row of `events` altered or deleted after it was sealed,
//! or a row inserted among sealed ones (with an explicit position), shows up
//! as the first link that does not recompute. What it does not prove: a
//! forger who can write both tables and recompute every later link leaves no
//! trace here; exports handed to auditors (and their `chain_anchor`) are the
//! outside copies that catch that. Events not yet sealed (the last seconds)
//! are not covered, and an insert that takes a fresh position is sealed like
//! any other event.
//!
//! The sealer links the events this process appended from the canonical
//! forms their MACs covered, kept at the append (`ledger_commands::unsealed`),
//! and reads back whole only the rows it has no form of. So a row altered
//! between its commit and its sealing is sealed as the ledger appended it,
//! and its link does not recompute either.

use crate::{link_event, link_form, AuditError, GENESIS};
use futures::TryStreamExt;
use ledger_commands::store::{self, recorded_from_row, EventMac, LogPoint, RecordedEvent, RECORDED_COLUMNS};
use ledger_commands::unsealed::UnsealedForms;
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const BATCH: i64 = 1_000;
/// The session advisory lock that makes one sealer lead.
const SEALER_LOCK: i64 = 0x4c45_4447_4348_4149;

/// The last sealed link: its point in the log and its hash.
async fn last_link(conn: &mut PgConnection) -> Result<(LogPoint, String), AuditError> {
    let row = sqlx::query(
        "SELECT transaction_id::text AS t, position, hash FROM event_chain ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok((LogPoint::START, GENESIS.to_owned())),
        Some(r) => {
            let t: String = r.try_get("t")?;
            let point = LogPoint {
                transaction_id: t
                    .parse()
                    .map_err(|_| AuditError::Invalid("a bad transaction id in event_chain".into()))?,
                position: r.try_get("position")?,
            };
            Ok((point, r.try_get("hash")?))
        }
    }
}

/// What one batch of the sealer linked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    /// Events linked.
    pub linked: usize,
    /// Of them, events whose rows were read back whole: no form of them
    /// was kept in this process.
    pub read_back: usize,
}

/// Seals what is settled and not yet sealed, one batch. Each event is
/// linked from the canonical form kept when this process appended it
/// (`forms`), or from its row, read back, for the others.
pub async fn seal_batch(conn: &mut PgConnection, forms: Option<&UnsealedForms>) -> Result<Sealed, AuditError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let (at, mut hash) = last_link(&mut tx).await?;
    let settled = store::read_settled_ids_after(&mut tx, at, BATCH).await?;
    if settled.is_empty() {
        // Ended now, not when the connection is next used: the sealer's own
        // connection would otherwise sit idle in this transaction through
        // its wait, holding its locks on the log.
        tx.rollback().await?;
        return Ok(Sealed::default());
    }
    let ids: Vec<_> = settled.iter().map(|(_, id)| *id).collect();
    let kept = match forms {
        Some(forms) => forms.take(&ids),
        None => vec![None; ids.len()],
    };
    let missing: Vec<i64> =
        settled.iter().zip(&kept).filter(|(_, form)| form.is_none()).map(|((point, _), _)| point.position).collect();
    let mut rows: HashMap<i64, RecordedEvent> = HashMap::with_capacity(missing.len());
    if !missing.is_empty() {
        rows.extend(store::read_at_positions(&mut tx, &missing).await?.into_iter().map(|e| (e.position, e)));
    }
    let (mut positions, mut txids, mut hashes) = (vec![], vec![], vec![]);
    let mut content = Vec::with_capacity(1024);
    for ((point, _), form) in settled.iter().zip(&kept) {
        hash = match form {
            Some(form) => link_form(&hash, form, point.position, &mut content),
            None => {
                let row = rows.get(&point.position).ok_or_else(|| {
                    AuditError::Invalid(format!("event {} was settled but could not be read back", point.position))
                })?;
                link_event(&hash, row)
            }
        };
        positions.push(point.position);
        txids.push(point.transaction_id.to_string());
        hashes.push(hash.clone());
    }
    sqlx::query(
        "INSERT INTO event_chain (position, transaction_id, hash)
         SELECT p, t::xid8, h FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS l(p, t, h)",
    )
    .bind(&positions)
    .bind(&txids)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Sealed { linked: settled.len(), read_back: missing.len() })
}

/// Follows the log and seals it. Several instances may run: one leads (a
/// session lock), and the chain's primary key refuses a second link anyway.
pub struct Sealer {
    pub pool: PgPool,
    pub interval: Duration,
    /// Where this process's appends keep their canonical forms, while this
    /// sealer leads.
    pub forms: Option<Arc<UnsealedForms>>,
}

/// Forms are kept while the sealer leads, and dropped when it stops, for
/// whatever reason (an error, or its future dropped at shutdown).
struct Keeping<'a>(Option<&'a UnsealedForms>);

impl Drop for Keeping<'_> {
    fn drop(&mut self) {
        if let Some(forms) = self.0 {
            forms.stop_keeping();
        }
    }
}

impl Sealer {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.lead() => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "chain sealer interrupted; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn lead(&self) -> Result<(), AuditError> {
        let mut conn = self.pool.acquire().await?.detach();
        loop {
            let leader: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(SEALER_LOCK).fetch_one(&mut conn).await?;
            if leader {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!("chain sealer is leading");
        let forms = self.forms.as_deref();
        let _keeping = Keeping(forms);
        if let Some(forms) = forms {
            forms.start_keeping();
        }
        // The batches are sealed on the lock's own connection: no pool
        // acquire and release (a ping each) per batch, and the batches'
        // statements keep the session alive and find a lost connection.
        loop {
            let sealed = seal_batch(&mut conn, forms).await?;
            if sealed.linked > 0 {
                tracing::debug!(linked = sealed.linked, read_back = sealed.read_back, "sealed");
            } else {
                tokio::time::sleep(self.interval).await;
            }
        }
    }
}

/// The first place the table and the chain disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// The event's row does not hash to its sealed link: altered after sealing.
    Altered { position: i64 },
    /// A sealed link whose event is gone: deleted.
    Missing { position: i64 },
    /// An event among sealed ones that was never sealed: inserted out of band.
    Inserted { position: i64 },
    /// An event whose row does not carry the service's MAC (or a wrong one):
    /// written or edited by something other than the ledger.
    Unauthenticated { position: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbVerification {
    pub sealed: u64,
    /// Events after the last link, not yet covered.
    pub unsealed: u64,
    pub first_break: Option<ChainBreak>,
}

/// Recomputes the chain from the events table and compares it with the links,
/// streaming both in tailing order. `progress(checked)` is called as it goes.
///
/// With `authenticator` (the service's key), each event's MAC is checked too:
/// that also catches rows inserted at the head of the log, which the sealer
/// would otherwise seal like any other, and rows edited together with a
/// rewritten chain. Events from before MACs existed are accepted until the
/// first authenticated one.
pub async fn verify_db(
    pool: &PgPool,
    authenticator: Option<&EventMac>,
    mut progress: impl FnMut(u64),
) -> Result<DbVerification, AuditError> {
    let mut events_conn = pool.acquire().await?;
    let mut links_conn = pool.acquire().await?;
    let sql = format!("SELECT {RECORDED_COLUMNS}, mac FROM events ORDER BY events.transaction_id, events.position");
    let mut authenticated_seen = false;
    let mut events = sqlx::query(&sql).fetch(&mut *events_conn);
    let mut links = sqlx::query(
        "SELECT position, transaction_id::text AS t, hash FROM event_chain ORDER BY transaction_id, position",
    )
    .fetch(&mut *links_conn);
    let mut result = DbVerification { sealed: 0, unsealed: 0, first_break: None };
    let mut hash = GENESIS.to_owned();
    let mut content = Vec::with_capacity(1024);
    let mut next_link = links.try_next().await?;
    let mut next_event = events.try_next().await?;
    loop {
        let link_point = match &next_link {
            Some(l) => Some(LogPoint {
                transaction_id: l.try_get::<String, _>("t")?.parse().unwrap_or(u64::MAX),
                position: l.try_get("position")?,
            }),
            None => None,
        };
        let event = match &next_event {
            Some(row) => Some(recorded_from_row(row)?),
            None => None,
        };
        // The form the MAC covers, when checking MACs: the link is made from it too.
        let mut form = None;
        if let (Some(e), Some(row), Some(auth)) = (&event, &next_event, authenticator) {
            let stored: Option<String> = row.try_get("mac")?;
            let (mac, canonical) = auth.of_with_form(e).unzip();
            form = canonical;
            // A payload with no MAC (one that does not parse) is never valid.
            let valid = stored.is_some() && stored == mac;
            if stored.is_some() && valid {
                authenticated_seen = true;
            } else if stored.is_some() || authenticated_seen {
                result.first_break.get_or_insert(ChainBreak::Unauthenticated { position: e.position });
            }
        }
        match (event, link_point) {
            (None, None) => break,
            (Some(_), None) => {
                result.unsealed += 1;
                next_event = events.try_next().await?;
            }
            (None, Some(p)) => {
                result.first_break.get_or_insert(ChainBreak::Missing { position: p.position });
                next_link = links.try_next().await?;
            }
            (Some(e), Some(p)) if e.point() == p => {
                let linked = match &form {
                    Some(form) => link_form(&hash, form, e.position, &mut content),
                    None => link_event(&hash, &e),
                };
                let sealed: String = next_link.as_ref().map(|l| l.try_get("hash")).transpose()?.unwrap_or_default();
                if linked != sealed && result.first_break.is_none() {
                    result.first_break = Some(ChainBreak::Altered { position: e.position });
                }
                // Continue from the sealed hash, so one altered row is reported once.
                hash = sealed;
                result.sealed += 1;
                progress(result.sealed);
                next_event = events.try_next().await?;
                next_link = links.try_next().await?;
            }
            (Some(e), Some(p)) if e.point() < p => {
                result.first_break.get_or_insert(ChainBreak::Inserted { position: e.position });
                next_event = events.try_next().await?;
            }
            (Some(_), Some(p)) => {
                result.first_break.get_or_insert(ChainBreak::Missing { position: p.position });
                next_link = links.try_next().await?;
            }
        }
    }
    Ok(result)
}
