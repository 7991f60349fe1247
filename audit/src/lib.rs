//! The audit trail: a tamper-evident export of the event log that an auditor
//! verifies offline, and a hash chain kept in the database itself.
//!
//! One rule hashes both: `hash = hex(SHA-256(previous_hash || "\n" ||
//! canonical_json(record)))`, starting from 64 zeros, where `record` is the
//! event as `record()` builds it and canonical JSON is RFC 8785 for this data
//! (`ledger_domain::canonical`). An export chains the records it contains,
//! in log order; the database chain covers every event in tailing order.

pub mod chain;
pub mod export;
pub mod verify;

use chrono::SecondsFormat;
use ledger_commands::store::RecordedEvent;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The exported form of an event: every column of the log. A payload that
/// does not parse into a tree (nested deeper than the parser goes, or a
/// number past its range: the ledger never writes one, a forger might) is
/// carried as its stored text, a JSON string, so that such a row neither
/// stops the chain's sealer nor fails an export; its MAC never verifies.
/// Such a row's record is the same as that of a row whose payload is that
/// text as a JSON string: the chain and an export do not tell the two
/// apart, the MAC does (neither can carry a valid one).
pub fn record(e: &RecordedEvent) -> Value {
    let payload = e.payload.to_value().unwrap_or_else(|_| Value::String(e.payload.get().to_owned()));
    json!({
        "position": e.position,
        "event_id": e.event_id,
        "stream_id": e.stream_id,
        "stream_version": e.stream_version,
        "event_type": e.event_type,
        "schema_version": e.schema_version,
        "payload": payload,
        "command_id": e.metadata.command_id,
        "correlation_id": e.metadata.correlation_id,
        "causation_id": e.metadata.causation_id,
        "actor_id": e.metadata.actor_id,
        "recorded_at": e.metadata.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "client_ip": e.metadata.client_ip,
        "user_agent": e.metadata.user_agent,
    })
}

/// The next link of a chain.
pub fn link(previous: &str, record: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(ledger_domain::canonical::to_string(record).as_bytes());
    hex::encode(hasher.finalize())
}

/// `link(previous, &record(e))` without building the record: the chain's
/// sealer links every event.
pub fn link_event(previous: &str, e: &RecordedEvent) -> String {
    let mut content = Vec::with_capacity(512);
    match ledger_commands::store::write_canonical(e, true, &mut content) {
        Ok(()) => link_content(previous, &content),
        // No tree to write field by field: the record carries the text.
        Err(_) => link(previous, &record(e)),
    }
}

/// The next link of a chain, from an event's canonical form (as its MAC
/// covers it) with `position` put in; `buffer` is reused between calls.
pub fn link_form(
    previous: &str,
    form: &ledger_commands::unsealed::CanonicalForm,
    position: i64,
    buffer: &mut Vec<u8>,
) -> String {
    buffer.clear();
    form.with_position(position, buffer);
    link_content(previous, buffer)
}

/// The next link of a chain, given the record's canonical JSON.
pub fn link_content(previous: &str, canonical: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical);
    hex::encode(hasher.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] ledger_commands::store::StoreError),
    #[error("the export's reader went away")]
    Closed,
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_covers_the_previous_hash_and_every_field() {
        let a = json!({"position": 1, "payload": {"amount": "1.00"}});
        let b = json!({"payload": {"amount": "1.00"}, "position": 1});
        assert_eq!(link(GENESIS, &a), link(GENESIS, &b), "key order does not matter");
        assert_ne!(link(GENESIS, &a), link(&link(GENESIS, &a), &a), "the previous hash does");
        let c = json!({"position": 1, "payload": {"amount": "1.01"}});
        assert_ne!(link(GENESIS, &a), link(GENESIS, &c));
        assert_eq!(link(GENESIS, &a).len(), 64);
    }

    #[test]
    fn linking_an_event_directly_equals_linking_its_record() {
        use ledger_commands::store::{EventMetadata, Payload};
        let mut e = RecordedEvent {
            position: 42,
            transaction_id: 9,
            event_id: uuid::Uuid::now_v7(),
            stream_id: "account-x".into(),
            stream_version: 3,
            event_type: "TransferRecorded".into(),
            schema_version: 3,
            payload: Payload::of(&json!({"z": "12.30", "a": {"y": [1, null, "\"q\"\n"]}, "é": "日本"})),
            metadata: EventMetadata {
                command_id: Some(uuid::Uuid::now_v7()),
                correlation_id: None,
                causation_id: None,
                actor_id: Some(uuid::Uuid::now_v7()),
                recorded_at: chrono::Utc::now(),
                client_ip: Some("203.0.113.9".into()),
                user_agent: Some("agent \"quoted\" \\ \u{1}".into()),
            },
        };
        assert_eq!(link_event(GENESIS, &e), link(GENESIS, &record(&e)));
        e.metadata = EventMetadata { recorded_at: e.metadata.recorded_at, ..Default::default() };
        assert_eq!(link_event(&link_event(GENESIS, &e), &e), link(&link(GENESIS, &record(&e)), &record(&e)));
        // A payload with no tree (a number past f64's range): the record carries its text.
        e.payload = serde_json::from_str("{\"a\": 1e400}").unwrap();
        assert!(e.payload.to_value().is_err());
        assert_eq!(record(&e)["payload"], json!("{\"a\": 1e400}"));
        assert_eq!(link_event(GENESIS, &e), link(GENESIS, &record(&e)));
    }
}
