//! Names of the JetStream stream, subjects and consumers, all derived from
//! `LEDGER_NATS_PREFIX` so several ledgers can share one NATS server.

#[derive(Clone, Debug)]
pub struct NatsNames {
    prefix: String,
}

// Names made without parsing or allocating: the relay sets them on every
// event it publishes.
pub const HEADER_POSITION: async_nats::HeaderName = async_nats::HeaderName::from_static("Ledger-Position");
pub const HEADER_TRANSACTION_ID: async_nats::HeaderName = async_nats::HeaderName::from_static("Ledger-Transaction-Id");
pub const HEADER_EVENT_TYPE: async_nats::HeaderName = async_nats::HeaderName::from_static("Ledger-Event-Type");

/// The idle heartbeat the read side's durable consumers (projector, payment
/// processes) ask of JetStream on every pull. A consumer lost without a
/// "409 Consumer Deleted" reaching the puller (seen in CI with NATS 2.9.10:
/// a stream deleted, the payment consumers told, the projector not), or a
/// server that hangs, is noticed after two missed heartbeats; the follower
/// then starts again, and a projector catches up from the log first. At 5 s
/// that was 10 s of a stale read side; at 1 s it is 2 s, within the 5 s a
/// `min_position` read waits, for one small message a second per idle
/// consumer. The margin is one heartbeat: a stall of the server, or of the
/// thread reading its socket, past ~1 s also restarts the run, which is
/// safe (checkpoints skip redeliveries) but wasted work.
pub const PULL_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

impl NatsNames {
    /// The prefix is reduced to letters, digits, `-` and `_`, which every
    /// JetStream name and subject token accepts.
    pub fn new(prefix: &str) -> NatsNames {
        let clean: String =
            prefix.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        NatsNames { prefix: if clean.is_empty() { "ledger".into() } else { clean } }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn stream(&self) -> String {
        format!("{}_events", self.prefix)
    }

    pub fn subjects(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    pub fn subject(&self, event_type: &str) -> String {
        format!("{}.events.{}", self.prefix, event_type)
    }

    pub fn consumer(&self, projection: &str) -> String {
        format!("{}_{}", self.prefix, projection)
    }
}

/// Creates the ledger's stream if it is missing: file storage, so NATS
/// restarts lose nothing, and a deduplication window for `Nats-Msg-Id`.
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    names: &NatsNames,
) -> Result<async_nats::jetstream::stream::Stream, async_nats::jetstream::context::CreateStreamError> {
    use async_nats::jetstream::stream::{Config, StorageType};
    js.get_or_create_stream(Config {
        name: names.stream(),
        subjects: vec![names.subjects()],
        storage: StorageType::File,
        duplicate_window: std::time::Duration::from_secs(120),
        ..Default::default()
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_safe_for_jetstream() {
        let n = super::NatsNames::new("my.ledger *1");
        assert_eq!(n.stream(), "my_ledger__1_events");
        assert_eq!(n.subject("TransferRecorded"), "my_ledger__1.events.TransferRecorded");
        assert_eq!(n.consumer("balances"), "my_ledger__1_balances");
    }
}
