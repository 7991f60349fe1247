//! Process managers: the payment process that moves orders along, and the
//! scheduler that expires holds. Both turn events or time into commands
//! whose Idempotency-Key is derived from what triggered them, so a
//! redelivered message or a second instance doing the same work has no
//! second effect: the command's recorded outcome is replayed instead.

use crate::balances;
use crate::ProjectionError;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use ledger_commands::nats::{ensure_stream, NatsNames, PULL_HEARTBEAT};
use ledger_commands::store::RecordedEvent;
use ledger_commands::{ClientInfo, CommandEnvelope, Ledger, LedgerCommand};
use ledger_domain::{DomainError, Event};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Rejections of system commands are recorded like any other, in this shape.
fn render(e: &DomainError) -> (u16, Value) {
    (422, json!({ "rejected": e.to_string() }))
}

/// An envelope for a command the system sends on its own behalf (the nil actor).
fn system_envelope(key: String, correlation: Option<Uuid>, causation: Option<Uuid>) -> CommandEnvelope {
    let request_hash = Sha256::digest(key.as_bytes()).to_vec();
    CommandEnvelope {
        actor: Uuid::nil(),
        idempotency_key: key,
        request_hash,
        correlation_id: correlation,
        client: ClientInfo::default(),
        causation_id: causation,
        unchecked_session: None,
    }
}

/// Pays for orders: `OrderPlaced` -> hold (or cancel when funds are short),
/// `OrderPaymentHeld` -> capture and finish (the auto-accept policy).
pub struct PaymentProcess {
    pub ledger: Ledger,
    pub js: jetstream::Context,
    pub names: NatsNames,
    pub auto_accept: bool,
}

/// What the payment process follows: one durable consumer per event type,
/// each filtered by one subject. Several subjects in one consumer
/// (`filter_subjects`) need NATS 2.10; a 2.9 server ignores the field and
/// delivers the whole stream, every event parsed and acknowledged one by one.
const TRIGGERS: [(&str, &str); 2] = [("OrderPlaced", "payments-placed"), ("OrderPaymentHeld", "payments-held")];

/// The single consumer of earlier versions, filtered by both subjects.
const FORMER_CONSUMER: &str = "payments";

impl PaymentProcess {
    pub async fn run(self, shutdown: CancellationToken) {
        let this = &self;
        futures::future::join_all(TRIGGERS.map(|(event_type, consumer)| {
            let shutdown = shutdown.clone();
            async move { this.follow(event_type, consumer, shutdown).await }
        }))
        .await;
    }

    async fn follow(&self, event_type: &str, consumer: &str, shutdown: CancellationToken) {
        let mut backoff = ledger_commands::backoff::Backoff::follower();
        loop {
            let started = Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.consume(event_type, consumer) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, consumer, "payment process interrupted; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.after(started.elapsed())) => {}
            }
        }
    }

    async fn consume(&self, event_type: &str, consumer: &str) -> Result<(), ProjectionError> {
        let nats = |e: &dyn std::fmt::Display| ProjectionError::Nats(e.to_string());
        let stream = ensure_stream(&self.js, &self.names).await.map_err(|e| nats(&e))?;
        let name = self.names.consumer(consumer);
        // Taking over from the former consumer: start after what it had
        // acknowledged (not from the stream's start, which would replay
        // every order's steps: harmless by their derived keys, but a burst).
        // It is removed once both successors exist.
        let former = self.names.consumer(FORMER_CONSUMER);
        let deliver_policy = match stream.consumer_info(&former).await {
            Ok(info) => DeliverPolicy::ByStartSequence { start_sequence: info.ack_floor.stream_sequence + 1 },
            // Only a former consumer known to be absent means "from the start":
            // a timeout must not make the successor replay every order.
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => DeliverPolicy::All,
            Err(e) => return Err(nats(&e)),
        };
        let consumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy,
                    filter_subject: self.names.subject(event_type),
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats(&e))?;
        let successors = TRIGGERS.map(|(_, c)| self.names.consumer(c));
        let mut all_there = true;
        for successor in &successors {
            all_there &= stream.consumer_info(successor).await.is_ok();
        }
        if all_there && stream.delete_consumer(&former).await.is_ok() {
            tracing::info!(consumer = %former, "the former payment consumer was removed");
        }
        let mut messages = consumer.stream().heartbeat(PULL_HEARTBEAT).messages().await.map_err(|e| nats(&e))?;
        tracing::info!(consumer = %name, auto_accept = self.auto_accept, "payment process consuming");
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| nats(&e))?;
            match self.handle(&message.payload).await {
                Ok(()) => message.ack().await.map_err(|e| nats(&e))?,
                Err(e) => {
                    // Left for redelivery; the derived key makes the retry safe.
                    tracing::warn!(error = %e, "payment step failed; it will be redelivered");
                    let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
        Err(ProjectionError::Nats("message stream ended".into()))
    }

    /// One step for one event. Public for tests that replay a delivery.
    pub async fn handle(&self, payload: &[u8]) -> Result<(), ProjectionError> {
        let recorded: RecordedEvent =
            serde_json::from_slice(payload).map_err(|e| ProjectionError::Nats(format!("unreadable event: {e}")))?;
        let event =
            recorded.decode().map_err(|source| ProjectionError::Decode { position: recorded.position, source })?;
        let (key, command, order_id) = match event {
            Event::OrderPlaced(o) => {
                (format!("pay:{}", recorded.event_id), LedgerCommand::PayOrder { order_id: o.order_id }, o.order_id)
            }
            Event::OrderPaymentHeld(o) if self.auto_accept => (
                format!("accept:{}", recorded.event_id),
                LedgerCommand::AcceptOrder { order_id: o.order_id },
                o.order_id,
            ),
            _ => return Ok(()),
        };
        let outcome = self
            .ledger
            .execute(&system_envelope(key, Some(order_id), Some(recorded.event_id)), command, render)
            .await
            .map_err(|e| ProjectionError::Nats(format!("command failed: {e}")))?;
        tracing::debug!(%order_id, status = outcome.status, replayed = outcome.replayed, "payment step");
        Ok(())
    }
}

/// Expires pending holds whose time has come. Safe on several instances at
/// once: each expiry's key is derived from the hold, and the decider refuses
/// a hold that is no longer pending.
pub struct HoldExpiry {
    pub ledger: Ledger,
    pub pool: sqlx::PgPool,
    pub interval: Duration,
}

impl HoldExpiry {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "hold expiry sweep failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// Expires what is due now; returns how many holds it expired.
    pub async fn sweep(&self) -> Result<usize, ProjectionError> {
        let due = balances::due_holds(&self.pool, 500).await?;
        let mut expired = 0;
        for hold_id in due {
            let outcome = self
                .ledger
                .execute(
                    &system_envelope(format!("expire:{hold_id}"), None, None),
                    LedgerCommand::ExpireHold { hold_id },
                    render,
                )
                .await
                .map_err(|e| ProjectionError::Nats(format!("command failed: {e}")))?;
            if outcome.status < 300 && !outcome.replayed {
                expired += 1;
            }
        }
        Ok(expired)
    }
}
