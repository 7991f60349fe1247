//! A projector: a JetStream durable consumer that applies events to one read
//! model. Each batch and its checkpoint commit in one PostgreSQL transaction,
//! and anything at or below the checkpoint is skipped, so redelivery and
//! crashes have no second effect.
//!
//! JetStream is the fan-out, not the source of truth: before applying a batch
//! the projector counts the log's events between its checkpoint and the
//! batch's end. If delivery skipped any (a lost stream, a redelivery out of
//! order), it reads that range from the log instead. Nothing is lost.

use crate::{checkpoint, Projection, ProjectionError};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use ledger_commands::nats::{ensure_stream, NatsNames};
use ledger_commands::store::{self, LogPoint, RecordedEvent};
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MAX_BATCH: usize = 500;

pub struct Projector {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub names: NatsNames,
    pub projection: Projection,
    /// Publishes the checkpoint after every commit, for in-process waiters.
    pub applied: watch::Sender<LogPoint>,
}

impl Projector {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.consume() => {
                    if let Err(e) = result {
                        tracing::warn!(projection = self.projection.name(), error = %e, "projector interrupted; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn consume(&self) -> Result<(), ProjectionError> {
        let nats = |e: &dyn std::fmt::Display| ProjectionError::Nats(e.to_string());
        let stream = ensure_stream(&self.js, &self.names).await.map_err(|e| nats(&e))?;
        let name = self.names.consumer(self.projection.name());
        let consumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    ack_policy: AckPolicy::All,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats(&e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(MAX_BATCH)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| nats(&e))?;
        tracing::info!(projection = self.projection.name(), consumer = %name, "projector consuming");
        let mut batches = messages.ready_chunks(MAX_BATCH);
        while let Some(batch) = batches.next().await {
            let mut received = Vec::with_capacity(batch.len());
            for message in batch {
                received.push(message.map_err(|e| nats(&e))?);
            }
            self.apply_batch(&received).await?;
        }
        Err(ProjectionError::Nats("message stream ended".into()))
    }

    async fn apply_batch(&self, messages: &[Message]) -> Result<(), ProjectionError> {
        let mut events: Vec<RecordedEvent> = messages
            .iter()
            .filter_map(|m| match serde_json::from_slice::<RecordedEvent>(&m.payload) {
                Ok(e) => Some(e),
                Err(e) => {
                    // The range check below reads it from the log instead.
                    tracing::error!(error = %e, "unreadable message on the event stream");
                    None
                }
            })
            .collect();
        let mut tx = self.pool.begin().await?;
        let from = checkpoint::lock(&mut tx, self.projection.name()).await?;
        events.retain(|e| e.point() > from);
        events.sort_by_key(RecordedEvent::point);
        events.dedup_by_key(|e| e.point());
        if let Some(through) = events.last().map(RecordedEvent::point) {
            let in_log = store::count_range(&mut tx, from, through).await?;
            if in_log != events.len() as i64 {
                tracing::warn!(
                    projection = self.projection.name(),
                    delivered = events.len(),
                    in_log,
                    "delivery skipped events; reading the range from the log"
                );
                events = store::read_range(&mut tx, from, through).await?;
            }
            self.projection.apply_all(&mut tx, &events).await?;
            checkpoint::save(&mut tx, self.projection.name(), through).await?;
            tx.commit().await?;
            self.applied.send_replace(through);
        } else {
            tx.rollback().await?;
        }
        // AckPolicy::All: acknowledging the last message acknowledges the batch.
        if let Some(last) = messages.last() {
            last.ack().await.map_err(|e| ProjectionError::Nats(e.to_string()))?;
        }
        Ok(())
    }
}
