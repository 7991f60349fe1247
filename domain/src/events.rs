//! The ledger's events: what happened, in the ledger's own words.
//!
//! Each event type has a schema version. A published version is never edited;
//! a change adds a new version and an upcaster in [`Event::from_stored`].

use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user joined the ledger. Credentials are never part of an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    /// The new user's id; also the stream `user-{user_id}`.
    pub user_id: Uuid,
    /// Normalised (trimmed, lower-case) email address.
    pub email: String,
    /// Optional name shown to other people.
    pub display_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// Owned by a user; its balance may never go below zero.
    User,
    /// The ledger's own account for a currency; the counterpart of deposits and
    /// withdrawals, and the only kind allowed to go negative.
    System,
}

/// An account (wallet) was opened in one currency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountOpened {
    /// The account's id; also the stream `account-{account_id}`.
    pub account_id: Uuid,
    /// The owning user; null for system accounts.
    pub owner_id: Option<Uuid>,
    /// ISO 4217 code.
    pub currency: String,
    /// `user` accounts never go below zero; `system` accounts may.
    pub kind: AccountKind,
    /// The owner's label for the account.
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// From the currency's system account to a user account.
    Deposit,
    /// From a user account back to the currency's system account.
    Withdrawal,
    /// From a user account to any account of the same currency.
    Transfer,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Deposit => "deposit",
            TransferKind::Withdrawal => "withdrawal",
            TransferKind::Transfer => "transfer",
        }
    }
}

/// A double-entry movement: `amount` left `from_account` and reached `to_account`,
/// both in `currency`, atomically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRecorded {
    /// The movement's id, answered as `transfer_id` by the API.
    pub transfer_id: Uuid,
    /// The debited account.
    pub from_account: Uuid,
    /// The credited account.
    pub to_account: Uuid,
    /// Positive decimal string with the currency's minor-unit digits, e.g. "12.30".
    #[schemars(with = "String")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// Deposit, withdrawal or transfer between accounts.
    pub kind: TransferKind,
    /// The client's free-text reference.
    pub reference: Option<String>,
}

/// Every event the ledger records.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    UserRegistered(UserRegistered),
    AccountOpened(AccountOpened),
    TransferRecorded(TransferRecorded),
}

/// A stored event that today's code cannot read.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("unknown event type {event_type} v{schema_version}")]
    UnknownType { event_type: String, schema_version: i32 },
    #[error("event {event_type} v{schema_version} has a malformed payload: {source}")]
    Payload { event_type: String, schema_version: i32, source: serde_json::Error },
}

/// Static description of one event type and version, for schemas and docs.
pub struct EventTypeInfo {
    /// Stream category, used as the schema folder (`user`, `account`).
    pub category: &'static str,
    pub event_type: &'static str,
    pub schema_version: i32,
    pub schema: fn() -> schemars::Schema,
}

/// Every event type and version the ledger has ever published.
pub fn event_types() -> Vec<EventTypeInfo> {
    vec![
        EventTypeInfo {
            category: "user",
            event_type: "UserRegistered",
            schema_version: 1,
            schema: || schemars::schema_for!(UserRegistered),
        },
        EventTypeInfo {
            category: "account",
            event_type: "AccountOpened",
            schema_version: 1,
            schema: || schemars::schema_for!(AccountOpened),
        },
        EventTypeInfo {
            category: "account",
            event_type: "TransferRecorded",
            schema_version: 1,
            schema: || schemars::schema_for!(TransferRecorded),
        },
    ]
}

impl Event {
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::UserRegistered(_) => "UserRegistered",
            Event::AccountOpened(_) => "AccountOpened",
            Event::TransferRecorded(_) => "TransferRecorded",
        }
    }

    /// The schema version this code writes.
    pub fn schema_version(&self) -> i32 {
        1
    }

    pub fn payload(&self) -> serde_json::Value {
        // Serializing these plain structs cannot fail: no maps with non-string keys.
        let value = match self {
            Event::UserRegistered(e) => serde_json::to_value(e),
            Event::AccountOpened(e) => serde_json::to_value(e),
            Event::TransferRecorded(e) => serde_json::to_value(e),
        };
        value.unwrap_or(serde_json::Value::Null)
    }

    /// Decodes a stored event, upcasting older schema versions to today's types.
    pub fn from_stored(
        event_type: &str,
        schema_version: i32,
        payload: serde_json::Value,
    ) -> Result<Event, EventDecodeError> {
        let wrap = |source| EventDecodeError::Payload { event_type: event_type.to_owned(), schema_version, source };
        match (event_type, schema_version) {
            ("UserRegistered", 1) => serde_json::from_value(payload).map(Event::UserRegistered).map_err(wrap),
            ("AccountOpened", 1) => serde_json::from_value(payload).map(Event::AccountOpened).map_err(wrap),
            ("TransferRecorded", 1) => serde_json::from_value(payload).map(Event::TransferRecorded).map_err(wrap),
            _ => Err(EventDecodeError::UnknownType { event_type: event_type.to_owned(), schema_version }),
        }
    }
}
