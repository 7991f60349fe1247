//! Session checks, read together: every request with an access token needs
//! its user's role and block and its session's state as they are now, so a
//! block or a revocation takes effect on the very next request. Concurrent
//! requests' checks are answered by one statement instead of one statement
//! (and a pooled connection's acquire and release) each; a check is still
//! read after its request arrived, so it is exactly as fresh as a check of
//! its own. The profile that motivated it: with one query per request, the
//! pool's connection pings and the query's round trip were a sixth of the
//! server's CPU at the bench's peak (BENCHMARKS.md).

use crate::identity::{credential_check, CredentialCheck};
use sqlx::{PgPool, Row};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most checks answered by one statement.
const MAX_BATCH: usize = 512;
/// A request whose batch has not answered by then (a stuck statement, a dead
/// connection) checks alone rather than waiting with the whole queue.
const WAIT_FOR_BATCH: std::time::Duration = std::time::Duration::from_secs(2);

struct Check {
    user_id: Uuid,
    session_id: Uuid,
    /// `None` when the batch's statement failed: the request checks alone,
    /// so it gets the error (or the answer) a check of its own would.
    reply: oneshot::Sender<Option<CredentialCheck>>,
}

#[derive(Clone)]
pub(crate) struct SessionChecks {
    queue: mpsc::Sender<Check>,
}

impl SessionChecks {
    /// Starts `readers` tasks; each takes everything queued (up to a batch),
    /// answers it with one statement, and comes back. Needs a Tokio runtime.
    pub(crate) fn start(pool: PgPool, readers: usize) -> SessionChecks {
        let (queue, receiver) = mpsc::channel::<Check>(MAX_BATCH * 4);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..readers.max(1) {
            let receiver = receiver.clone();
            let pool = pool.clone();
            tokio::spawn(async move {
                while let Some(batch) = next_batch(&receiver).await {
                    let pairs: Vec<(Uuid, Uuid)> = batch.iter().map(|c| (c.user_id, c.session_id)).collect();
                    match check_all(&pool, &pairs).await {
                        Ok(answers) => {
                            for (check, answer) in batch.into_iter().zip(answers) {
                                let _ = check.reply.send(Some(answer));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, size = batch.len(), "batched session check failed; checking one by one");
                            for check in batch {
                                let _ = check.reply.send(None);
                            }
                        }
                    }
                }
            });
        }
        SessionChecks { queue }
    }

    /// The session's state, or `None` when the batch could not answer it in
    /// time (the caller checks alone).
    pub(crate) async fn check(&self, user_id: Uuid, session_id: Uuid) -> Option<CredentialCheck> {
        let (reply, answer) = oneshot::channel();
        let queued = Check { user_id, session_id, reply };
        tokio::time::timeout(WAIT_FOR_BATCH, async {
            self.queue.send(queued).await.ok()?;
            answer.await.ok().flatten()
        })
        .await
        .ok()
        .flatten()
    }
}

/// Waits for one check, then takes whatever else is queued.
async fn next_batch(receiver: &tokio::sync::Mutex<mpsc::Receiver<Check>>) -> Option<Vec<Check>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let Ok(check) = receiver.try_recv() else { break };
        batch.push(check);
    }
    Some(batch)
}

/// One answer per (user, session) pair, in order: the statement of
/// `Ledger::check_session` over every pair at once.
pub async fn check_all(pool: &PgPool, pairs: &[(Uuid, Uuid)]) -> Result<Vec<CredentialCheck>, sqlx::Error> {
    let users: Vec<Uuid> = pairs.iter().map(|p| p.0).collect();
    let sessions: Vec<Uuid> = pairs.iter().map(|p| p.1).collect();
    let rows = sqlx::query(
        "SELECT q.i, c.role, c.blocked,
                (s.session_id IS NOT NULL AND s.revoked_at IS NULL AND s.expires_at > now()) AS active
         FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS q(user_id, session_id, i)
         JOIN credentials c ON c.user_id = q.user_id
         LEFT JOIN sessions s ON s.session_id = q.session_id AND s.user_id = c.user_id",
    )
    .bind(&users)
    .bind(&sessions)
    .fetch_all(pool)
    .await?;
    // A pair without a row names no user: its session has ended.
    let mut answers: Vec<CredentialCheck> = pairs.iter().map(|_| CredentialCheck::Ended).collect();
    for row in rows {
        let i: i64 = row.try_get("i")?;
        let index = usize::try_from(i - 1)
            .ok()
            .filter(|&index| index < pairs.len())
            .ok_or_else(|| sqlx::Error::Protocol(format!("session check answered pair {i} of {}", pairs.len())))?;
        answers[index] = credential_check(pairs[index].0, &row)?;
    }
    Ok(answers)
}

/// Sessions a write found ended, remembered by this process: an ended
/// session never becomes live again (a block ends the user's sessions too),
/// so a token whose write was refused is refused again from memory at the
/// door, before it can spend its user's rate limit. Only an optimisation of
/// the answer's path: forgetting (the set is cleared when full) loses nothing.
#[derive(Clone, Default)]
pub(crate) struct EndedSessions {
    known: Arc<std::sync::Mutex<std::collections::HashSet<Uuid>>>,
}

/// Sessions remembered before the memory is cleared.
const ENDED_SESSIONS: usize = 100_000;

impl EndedSessions {
    pub(crate) fn remember(&self, session_id: Uuid) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= ENDED_SESSIONS {
            known.clear();
        }
        known.insert(session_id);
    }

    pub(crate) fn contains(&self, session_id: Uuid) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(&session_id)
    }
}
