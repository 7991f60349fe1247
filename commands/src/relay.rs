//! The relay: publishes the event log, in tailing order, to JetStream.
//!
//! One relay leads at a time (a PostgreSQL session advisory lock); the others
//! stand by. Its checkpoint lives in PostgreSQL and advances only after
//! JetStream acknowledged every event of a batch; while busy it is saved at
//! most every 100 ms, so a crash republishes at most that long's events (and
//! one batch), which `Nats-Msg-Id` deduplication (a 120 s window) drops.

use crate::nats::{ensure_stream, NatsNames, HEADER_EVENT_TYPE, HEADER_POSITION, HEADER_TRANSACTION_ID};
use crate::store::{self, LogPoint, RecordedEvent};
use async_nats::jetstream;
use sqlx::{PgConnection, PgPool, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] store::StoreError),
    #[error("publish: {0}")]
    Publish(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    Woken,
    Quiet,
    Stopping,
}

/// How long a stopping relay may take to save its cursor.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often, at most, a busy relay saves its cursor.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Only a read that found fewer events than this is followed by the pace's
/// wait: at the peak reads are larger and a wait would be lag for nothing.
/// The projector paces its batches by the same line (one light load for
/// the whole read side).
pub const PACED_BELOW: usize = 64;

pub struct Relay {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub names: NatsNames,
    /// Woken by local appends; remote appends are found by polling.
    pub wake: Arc<Notify>,
    pub batch_size: i64,
    pub idle_poll: Duration,
    /// After a read that found few events (under `PACED_BELOW`), the
    /// shortest time to the next read: each read costs a round trip and a
    /// statement whether it finds one group's events or many, and under a
    /// light load every group commit woke the relay for a read of a few
    /// events and an empty one after it. Zero: read again at once.
    pub pace: Duration,
}

impl Relay {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = crate::backoff::Backoff::follower();
        loop {
            let started = std::time::Instant::now();
            // `lead` watches `shutdown` itself, to save its cursor on the way
            // out; it gets `SHUTDOWN_GRACE` for that, so a statement hanging
            // on an unreachable database cannot hold up the process's exit.
            let grace = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            let result = tokio::select! {
                result = self.lead(&shutdown) => result,
                _ = grace => return,
            };
            if shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "relay interrupted; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.after(started.elapsed())) => {}
            }
        }
    }

    fn lock_key(&self) -> i64 {
        // Stable across processes: FNV-1a of the stream name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.names.stream().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h as i64
    }

    /// Waits to become the leader, then publishes until an error or until
    /// `shutdown`, when it saves its cursor first.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        // A dedicated connection: the session lock lives and dies with it.
        let mut conn = self.pool.acquire().await?.detach();
        // Its checkpoint is a cursor: lost on a crash, the last batch is
        // published again and JetStream drops it by message id.
        sqlx::query("SET synchronous_commit = off").execute(&mut conn).await?;
        crate::store::prefer_tailing_order(&mut conn).await?;
        loop {
            let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.lock_key())
                .fetch_one(&mut conn)
                .await?;
            if leader {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(stream = %self.names.stream(), "relay is leading");
        let mut checkpoint = self.load_checkpoint(&mut conn).await?;
        // The cursor is saved at most every CHECKPOINT_EVERY while busy, once
        // idle for a whole poll, and on shutdown: what a crash re-publishes
        // is a fraction of a second's events, well inside JetStream's
        // deduplication window.
        let mut saved = (checkpoint, std::time::Instant::now());
        // The stream is looked up (and created if missing) when leading
        // starts and after a failed publish, not before every batch.
        let mut stream_ready = false;
        let mut publish_backoff = Duration::from_millis(50);
        // When the last read started, if it found few events.
        let mut last_small: Option<std::time::Instant> = None;
        loop {
            if let Some(last) = last_small.filter(|_| !self.pace.is_zero()) {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until((last + self.pace).into()) => {}
                }
            }
            let started = std::time::Instant::now();
            let events = store::read_settled_after(&mut conn, checkpoint, self.batch_size).await?;
            last_small = (events.len() < PACED_BELOW).then_some(started);
            let read = started.elapsed();
            let Some(last) = events.last().map(RecordedEvent::point) else {
                // Caught up. The cursor is saved once nothing came for a
                // whole poll (or when it is due anyway), not at every
                // catch-up: under a light load that is every few events.
                let idle = tokio::select! {
                    _ = shutdown.cancelled() => Idle::Stopping,
                    _ = self.wake.notified() => Idle::Woken,
                    _ = tokio::time::sleep(self.idle_poll) => Idle::Quiet,
                };
                if saved.0 != checkpoint && (idle != Idle::Woken || saved.1.elapsed() >= CHECKPOINT_EVERY) {
                    self.save_checkpoint(&mut conn, checkpoint).await?;
                    saved = (checkpoint, std::time::Instant::now());
                }
                if idle == Idle::Stopping {
                    return Ok(());
                }
                continue;
            };
            let published = tokio::select! {
                _ = shutdown.cancelled() => None,
                result = self.publish(&events, !stream_ready) => Some(result),
            };
            let Some(published) = published else {
                // Stopping mid-batch: the cursor stays before it.
                if saved.0 != checkpoint {
                    self.save_checkpoint(&mut conn, checkpoint).await?;
                }
                return Ok(());
            };
            if let Err(e) = published {
                tracing::warn!(error = %e, "publishing to JetStream failed; will retry");
                stream_ready = false;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(publish_backoff) => {}
                }
                publish_backoff = (publish_backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            stream_ready = true;
            publish_backoff = Duration::from_millis(50);
            checkpoint = last;
            if saved.1.elapsed() >= CHECKPOINT_EVERY || shutdown.is_cancelled() {
                self.save_checkpoint(&mut conn, checkpoint).await?;
                saved = (checkpoint, std::time::Instant::now());
            }
            tracing::debug!(
                count = events.len(),
                position = last.position,
                read_ms = read.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                // How long ago the batch's newest event was decided: the
                // relay's part of the read side's lag.
                newest_age_ms = age_ms(events.iter().map(|e| e.metadata.recorded_at).max()),
                "relayed"
            );
        }
    }

    async fn publish(&self, events: &[RecordedEvent], ensure_stream_first: bool) -> Result<(), RelayError> {
        let fail = |e: &dyn std::fmt::Display| RelayError::Publish(e.to_string());
        if ensure_stream_first {
            ensure_stream(&self.js, &self.names).await.map_err(|e| fail(&e))?;
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.event_id.to_string());
            headers.insert(HEADER_POSITION, event.position.to_string());
            headers.insert(HEADER_TRANSACTION_ID, event.transaction_id.to_string());
            headers.insert(HEADER_EVENT_TYPE, event.event_type.clone());
            let payload = serde_json::to_vec(event).map_err(|e| fail(&e))?;
            let ack = self
                .js
                .publish_with_headers(self.names.subject(&event.event_type), headers, payload.into())
                .await
                .map_err(|e| fail(&e))?;
            acks.push(ack);
        }
        // Every ack is awaited before the checkpoint moves.
        let all = futures::future::try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future));
        match tokio::time::timeout(Duration::from_secs(10), all).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(fail(&e)),
            Err(_) => Err(RelayError::Publish("timed out waiting for JetStream acks".into())),
        }
    }

    async fn load_checkpoint(&self, conn: &mut PgConnection) -> Result<LogPoint, RelayError> {
        let row = sqlx::query("SELECT transaction_id::text AS t, position FROM relay_checkpoints WHERE stream = $1")
            .bind(self.names.stream())
            .fetch_optional(&mut *conn)
            .await?;
        Ok(match row {
            None => LogPoint::START,
            Some(row) => LogPoint {
                transaction_id: row.try_get::<String, _>("t")?.parse().unwrap_or(0),
                position: row.try_get("position")?,
            },
        })
    }

    async fn save_checkpoint(&self, conn: &mut PgConnection, point: LogPoint) -> Result<(), RelayError> {
        sqlx::query(
            "INSERT INTO relay_checkpoints (stream, transaction_id, position) VALUES ($1, $2::text::xid8, $3)
             ON CONFLICT (stream) DO UPDATE
             SET transaction_id = excluded.transaction_id, position = excluded.position, updated_at = now()",
        )
        .bind(self.names.stream())
        .bind(point.transaction_id.to_string())
        .bind(point.position)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// How many events the relay has not published yet (capped, for health checks).
pub async fn relay_lag(pool: &PgPool, names: &NatsNames) -> Result<i64, RelayError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query("SELECT transaction_id::text AS t, position FROM relay_checkpoints WHERE stream = $1")
        .bind(names.stream())
        .fetch_optional(&mut *conn)
        .await?;
    let after = match row {
        None => LogPoint::START,
        Some(row) => LogPoint {
            transaction_id: row.try_get::<String, _>("t")?.parse().unwrap_or(0),
            position: row.try_get("position")?,
        },
    };
    Ok(store::count_after(&mut conn, after, 1_000_000).await?)
}

/// Milliseconds since `at` (0 for none): the lag lines of the relay and the projector.
pub fn age_ms(at: Option<chrono::DateTime<chrono::Utc>>) -> i64 {
    at.map_or(0, |at| (chrono::Utc::now() - at).num_milliseconds())
}
