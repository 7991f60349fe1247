//! The ledger's events: what happened, in the ledger's own words.
//!
//! Each event type has a schema version. A published version is never edited;
//! a change adds a new version and an upcaster in [`Event::from_stored`].

use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user joined the ledger. Credentials are never part of an event; the
/// personal fields are sealed with the user's own key (crypto-shredding).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    /// The new user's id; also the stream `user-{user_id}`.
    pub user_id: Uuid,
    /// Personal: the normalised email, sealed as `pii:v1:<base64>` with the user's key.
    pub email: String,
    /// Personal: the name shown to others, sealed like `email`.
    pub display_name: Option<String>,
}

/// An admin forgot a user: their personal-data key was destroyed, so every
/// sealed personal field of theirs now reads as `[erased]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserForgotten {
    /// The forgotten user.
    pub user_id: Uuid,
    /// Why, as the admin gave it.
    pub reason: String,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// From the currency's system account to a user account.
    Deposit,
    /// From a user account back to the currency's system account.
    Withdrawal,
    /// From a user account to any account of the same currency.
    Transfer,
    /// The captured part of a hold, from the held account to the hold's payee.
    HoldCapture,
    /// A fee, from the payer to the currency's fee account, with the movement it is for.
    Fee,
    /// A refund of an order, from the merchant's account to the customer's.
    Refund,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Deposit => "deposit",
            TransferKind::Withdrawal => "withdrawal",
            TransferKind::Transfer => "transfer",
            TransferKind::HoldCapture => "hold_capture",
            TransferKind::Fee => "fee",
            TransferKind::Refund => "refund",
        }
    }

    pub fn parse(text: &str) -> Option<TransferKind> {
        [
            TransferKind::Deposit,
            TransferKind::Withdrawal,
            TransferKind::Transfer,
            TransferKind::HoldCapture,
            TransferKind::Fee,
            TransferKind::Refund,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// Published versions that today's code reads through an upcaster. Frozen:
/// their schemas must stay byte-identical (see `events-schema/`).
pub mod published {
    /// `TransferRecorded` v2, before `channel`.
    pub mod transfer_recorded_v2 {
        use rust_decimal::Decimal;
        use schemars::JsonSchema;
        use serde::{Deserialize, Serialize};
        use uuid::Uuid;

        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum TransferKind {
            /// From the currency's system account to a user account.
            Deposit,
            /// From a user account back to the currency's system account.
            Withdrawal,
            /// From a user account to any account of the same currency.
            Transfer,
            /// The captured part of a hold, from the held account to the hold's payee.
            HoldCapture,
            /// A fee, from the payer to the currency's fee account, with the movement it is for.
            Fee,
            /// A refund of an order, from the merchant's account to the customer's.
            Refund,
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
            /// What kind of movement: deposit, withdrawal, transfer, hold capture, fee or refund.
            pub kind: TransferKind,
            /// The client's free-text reference.
            pub reference: Option<String>,
        }
    }

    /// `UserRegistered` v1: personal fields in the clear.
    pub mod user_registered_v1 {
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
    }

    /// `LoginFailed` v1: the email in the clear.
    pub mod login_failed_v1 {
        use super::super::LoginFailure;
        use schemars::JsonSchema;
        use serde::{Deserialize, Serialize};
        use uuid::Uuid;

        /// A login was refused. The password tried is never recorded.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct LoginFailed {
            /// The user the email belongs to, if any.
            pub user_id: Option<Uuid>,
            /// The email as normalised, or as sent if it was not a valid address (truncated).
            pub email: String,
            /// Why it was refused.
            pub reason: LoginFailure,
        }
    }

    /// `TransferRecorded` v1, before holds, fees and refunds added transfer kinds.
    pub mod transfer_recorded_v1 {
        use rust_decimal::Decimal;
        use schemars::JsonSchema;
        use serde::{Deserialize, Serialize};
        use uuid::Uuid;

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
    /// What kind of movement: deposit, withdrawal, transfer, hold capture, fee or refund.
    pub kind: TransferKind,
    /// The client's free-text reference.
    pub reference: Option<String>,
    /// How the movement was asked for. Events before v3 read as `api`.
    pub channel: Channel,
}

/// How a movement was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A client's request through the HTTP API.
    #[default]
    Api,
    /// The ledger itself: the payment process accepting an order.
    System,
}

/// Funds reserved on `from_account` for a later capture to `to_account`:
/// `available` drops, `balance` does not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldPlaced {
    /// The hold's id.
    pub hold_id: Uuid,
    /// The account the funds are reserved on.
    pub from_account: Uuid,
    /// The account a capture pays.
    pub to_account: Uuid,
    /// The reserved amount, a decimal string.
    #[schemars(with = "String")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// When it expires if neither captured nor released.
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The client's free-text reference.
    pub reference: Option<String>,
    /// The order the hold pays for, if any.
    pub order_id: Option<Uuid>,
}

/// A hold was captured: `amount` moved (as the `TransferRecorded` with the
/// same `transfer_id`), and the rest of the hold, `released`, was freed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldCaptured {
    /// The hold.
    pub hold_id: Uuid,
    /// The held account.
    pub from_account: Uuid,
    /// The account paid.
    pub to_account: Uuid,
    /// The captured amount, at most the held amount.
    #[schemars(with = "String")]
    pub amount: Decimal,
    /// The part of the hold freed without moving.
    #[schemars(with = "String")]
    pub released: Decimal,
    /// The movement that carried the captured amount.
    pub transfer_id: Uuid,
}

/// A hold was released: its funds are available again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldReleased {
    /// The hold.
    pub hold_id: Uuid,
    /// The held account.
    pub from_account: Uuid,
}

/// A hold reached its expiry unresolved: its funds are available again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldExpired {
    /// The hold.
    pub hold_id: Uuid,
    /// The held account.
    pub from_account: Uuid,
}

/// A customer placed an order to be paid from their account.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    /// The order's id; also the stream `order-{order_id}`.
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The customer's account that pays.
    pub account_id: Uuid,
    /// The merchant's account that is paid.
    pub merchant_account: Uuid,
    /// The price, a decimal string.
    #[schemars(with = "String")]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// What is bought.
    pub description: String,
}

/// The payment process reserved the order's amount.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPaymentHeld {
    /// The order.
    pub order_id: Uuid,
    /// The hold on the customer's account.
    pub hold_id: Uuid,
}

/// The merchant accepted and the hold was captured: the order is FINISHED.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderFinished {
    /// The order.
    pub order_id: Uuid,
    /// The movement that paid the merchant.
    pub transfer_id: Uuid,
    /// The amount captured.
    #[schemars(with = "String")]
    pub amount: Decimal,
}

/// Why an order was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CancelReason {
    /// The customer's account could not cover the amount.
    InsufficientFunds,
    /// The customer cancelled it while NEW.
    CustomerCancelled,
    /// The hold expired before the merchant accepted.
    HoldExpired,
    /// The payment could not be made for another reason (e.g. a frozen account).
    PaymentRefused,
}

/// The order is CANCELLED; any hold was released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Why.
    pub reason: CancelReason,
}

/// Part or all of a finished order was paid back (as the `TransferRecorded` with `transfer_id`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRefunded {
    /// The order.
    pub order_id: Uuid,
    /// The movement that paid the customer back.
    pub transfer_id: Uuid,
    /// The refunded amount.
    #[schemars(with = "String")]
    pub amount: Decimal,
}

/// What a user may do. Checked on every request, together with ownership.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Their own accounts and data only.
    #[default]
    User,
    /// Reads any user's data; changes nothing of anyone else's.
    Support,
    /// Support, plus roles, blocking and freezing.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Support => "support",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "support" => Some(Role::Support),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An admin (or the `ledger admin` CLI) gave a user another role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChanged {
    /// The user whose role changed.
    pub user_id: Uuid,
    /// The role from now on.
    pub role: Role,
    /// The role before.
    pub previous_role: Role,
    /// Why, as the admin gave it.
    pub reason: Option<String>,
}

/// An admin blocked a user: no logins, sessions revoked, tokens refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBlocked {
    /// The blocked user.
    pub user_id: Uuid,
    /// Why, as the admin gave it.
    pub reason: String,
}

/// An admin lifted a block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUnblocked {
    /// The unblocked user.
    pub user_id: Uuid,
    /// Why, as the admin gave it.
    pub reason: String,
}

/// A user changed their password; their other sessions were revoked. The
/// password and its hash never enter the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChanged {
    /// Whose password changed.
    pub user_id: Uuid,
}

/// A user turned on TOTP two-factor authentication. The secret is never in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorEnabled {
    /// Who turned it on.
    pub user_id: Uuid,
}

/// A user turned off two-factor authentication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorDisabled {
    /// Who turned it off.
    pub user_id: Uuid,
}

/// The second factor a login used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactor {
    /// A TOTP code from an authenticator app.
    Totp,
    /// One of the one-time recovery codes.
    RecoveryCode,
}

/// A user logged in and a session began.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserLoggedIn {
    /// Who logged in.
    pub user_id: Uuid,
    /// The new session; its refresh tokens rotate within it.
    pub session_id: Uuid,
    /// The second factor used, if two-factor authentication is on.
    pub second_factor: Option<SecondFactor>,
}

/// Why a login was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoginFailure {
    /// No user has this email.
    UnknownEmail,
    /// The password did not match.
    WrongPassword,
    /// Two-factor authentication is on and no code came with the password.
    TwoFactorRequired,
    /// The TOTP or recovery code was wrong or already used.
    TwoFactorInvalid,
    /// The user is blocked.
    UserBlocked,
}

/// A login was refused. The password tried is never recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginFailed {
    /// The user the email belongs to, if any.
    pub user_id: Option<Uuid>,
    /// Personal: the email tried, sealed with the user's key when the user is
    /// known; otherwise a keyed pseudonym `pseudonym:<hex>` of the address.
    pub email: String,
    /// Why it was refused.
    pub reason: LoginFailure,
}

/// A user logged out of one session, or of all of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoggedOut {
    /// Who logged out.
    pub user_id: Uuid,
    /// The sessions that ended.
    pub session_ids: Vec<Uuid>,
    /// True for "log out everywhere".
    pub all_sessions: bool,
}

/// A user ended one of their sessions from the session list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRevoked {
    /// Whose session.
    pub user_id: Uuid,
    /// The session that ended.
    pub session_id: Uuid,
}

/// A refresh token that had already been rotated was presented again: a sign
/// of theft. The whole session was revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshTokenReused {
    /// Whose session.
    pub user_id: Uuid,
    /// The revoked session.
    pub session_id: Uuid,
}

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiScope {
    /// GET requests.
    Read,
    /// Commands (POST).
    Write,
}

/// A user created an API key. Only its hash is stored, never in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreated {
    /// The key's owner.
    pub user_id: Uuid,
    /// The key's id (not the secret).
    pub key_id: Uuid,
    /// The owner's label for it.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<ApiScope>,
}

/// A user revoked an API key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyRevoked {
    /// The key's owner.
    pub user_id: Uuid,
    /// The revoked key.
    pub key_id: Uuid,
}

/// An admin froze an account: it refuses debits and credits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountFrozen {
    /// The frozen account.
    pub account_id: Uuid,
    /// Why, as the admin gave it.
    pub reason: String,
}

/// An admin lifted a freeze.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountUnfrozen {
    /// The account.
    pub account_id: Uuid,
    /// Why, as the admin gave it.
    pub reason: String,
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
    /// Stream category, used as the schema folder (`user`, `account`, `security`).
    pub category: &'static str,
    pub event_type: &'static str,
    pub schema_version: i32,
    pub schema: fn() -> schemars::Schema,
}

/// Declares the `Event` enum and everything that maps it to and from the log,
/// from one list, so a new event cannot be half registered.
macro_rules! ledger_events {
    ($($name:ident => $category:literal v $version:literal),+ $(,)?) => {
        /// Every event the ledger records.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Event {
            $($name($name),)+
        }

        /// Every event type and version the ledger has ever published.
        pub fn event_types() -> Vec<EventTypeInfo> {
            let mut types = vec![$(EventTypeInfo {
                category: $category,
                event_type: stringify!($name),
                schema_version: $version,
                schema: || schemars::schema_for!($name),
            },)+];
            types.extend(published_versions());
            types.sort_by_key(|t| (t.category, t.event_type, t.schema_version));
            types
        }

        impl Event {
            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Event::$name(_) => stringify!($name),)+
                }
            }

            /// The stream category the event belongs to.
            pub fn category(&self) -> &'static str {
                match self {
                    $(Event::$name(_) => $category,)+
                }
            }

            /// The schema version this code writes.
            pub fn schema_version(&self) -> i32 {
                match self {
                    $(Event::$name(_) => $version,)+
                }
            }

            pub fn payload(&self) -> serde_json::Value {
                // Serializing these plain structs cannot fail: no maps with non-string keys.
                let value = match self {
                    $(Event::$name(e) => serde_json::to_value(e),)+
                };
                value.unwrap_or(serde_json::Value::Null)
            }

            /// Decodes a stored event, upcasting older schema versions to today's types.
            pub fn from_stored(
                event_type: &str,
                schema_version: i32,
                payload: serde_json::Value,
            ) -> Result<Event, EventDecodeError> {
                let wrap =
                    |source| EventDecodeError::Payload { event_type: event_type.to_owned(), schema_version, source };
                match (event_type, schema_version) {
                    $((stringify!($name), $version) => serde_json::from_value(payload).map(Event::$name).map_err(wrap),)+
                    _ => upcast(event_type, schema_version, payload),
                }
            }

            /// `from_stored` from the payload's JSON text as stored: today's
            /// schema versions are parsed straight into their types, with no
            /// JSON tree in between (older ones are upcast from a tree).
            pub fn from_stored_str(
                event_type: &str,
                schema_version: i32,
                payload: &str,
            ) -> Result<Event, EventDecodeError> {
                let wrap =
                    |source| EventDecodeError::Payload { event_type: event_type.to_owned(), schema_version, source };
                match (event_type, schema_version) {
                    $((stringify!($name), $version) => serde_json::from_str::<$name>(payload).map(Event::$name).map_err(wrap),)+
                    _ => upcast(event_type, schema_version, serde_json::from_str(payload).map_err(wrap)?),
                }
            }
        }
    };
}

ledger_events! {
    UserRegistered => "user" v 2,
    UserForgotten => "user" v 1,
    RoleChanged => "user" v 1,
    UserBlocked => "user" v 1,
    UserUnblocked => "user" v 1,
    PasswordChanged => "user" v 1,
    TwoFactorEnabled => "user" v 1,
    TwoFactorDisabled => "user" v 1,
    AccountOpened => "account" v 1,
    TransferRecorded => "account" v 3,
    AccountFrozen => "account" v 1,
    AccountUnfrozen => "account" v 1,
    HoldPlaced => "account" v 1,
    HoldCaptured => "account" v 1,
    HoldReleased => "account" v 1,
    HoldExpired => "account" v 1,
    OrderPlaced => "order" v 1,
    OrderPaymentHeld => "order" v 1,
    OrderFinished => "order" v 1,
    OrderCancelled => "order" v 1,
    OrderRefunded => "order" v 1,
    UserLoggedIn => "security" v 1,
    LoginFailed => "security" v 2,
    LoggedOut => "security" v 1,
    SessionRevoked => "security" v 1,
    RefreshTokenReused => "security" v 1,
    ApiKeyCreated => "security" v 1,
    ApiKeyRevoked => "security" v 1,
}

/// Older versions still in the log, with their frozen schemas.
fn published_versions() -> Vec<EventTypeInfo> {
    vec![
        EventTypeInfo {
            category: "account",
            event_type: "TransferRecorded",
            schema_version: 1,
            schema: || schemars::schema_for!(published::transfer_recorded_v1::TransferRecorded),
        },
        EventTypeInfo {
            category: "account",
            event_type: "TransferRecorded",
            schema_version: 2,
            schema: || schemars::schema_for!(published::transfer_recorded_v2::TransferRecorded),
        },
        EventTypeInfo {
            category: "user",
            event_type: "UserRegistered",
            schema_version: 1,
            schema: || schemars::schema_for!(published::user_registered_v1::UserRegistered),
        },
        EventTypeInfo {
            category: "security",
            event_type: "LoginFailed",
            schema_version: 1,
            schema: || schemars::schema_for!(published::login_failed_v1::LoginFailed),
        },
    ]
}

/// Reads an older version as today's type.
fn upcast(event_type: &str, schema_version: i32, payload: serde_json::Value) -> Result<Event, EventDecodeError> {
    let wrap = |source| EventDecodeError::Payload { event_type: event_type.to_owned(), schema_version, source };
    match (event_type, schema_version) {
        // v1's kinds are a subset of v2's; the fields are the same.
        ("TransferRecorded", 1) => {
            let old: published::transfer_recorded_v1::TransferRecorded =
                serde_json::from_value(payload).map_err(wrap)?;
            use published::transfer_recorded_v1::TransferKind as V1;
            Ok(Event::TransferRecorded(TransferRecorded {
                transfer_id: old.transfer_id,
                from_account: old.from_account,
                to_account: old.to_account,
                amount: old.amount,
                currency: old.currency,
                kind: match old.kind {
                    V1::Deposit => TransferKind::Deposit,
                    V1::Withdrawal => TransferKind::Withdrawal,
                    V1::Transfer => TransferKind::Transfer,
                },
                reference: old.reference,
                channel: Channel::Api,
            }))
        }
        // v2 had no channel: every movement then came through the API.
        ("TransferRecorded", 2) => {
            let old: published::transfer_recorded_v2::TransferRecorded =
                serde_json::from_value(payload).map_err(wrap)?;
            use published::transfer_recorded_v2::TransferKind as V2;
            Ok(Event::TransferRecorded(TransferRecorded {
                transfer_id: old.transfer_id,
                from_account: old.from_account,
                to_account: old.to_account,
                amount: old.amount,
                currency: old.currency,
                kind: match old.kind {
                    V2::Deposit => TransferKind::Deposit,
                    V2::Withdrawal => TransferKind::Withdrawal,
                    V2::Transfer => TransferKind::Transfer,
                    V2::HoldCapture => TransferKind::HoldCapture,
                    V2::Fee => TransferKind::Fee,
                    V2::Refund => TransferKind::Refund,
                },
                reference: old.reference,
                channel: Channel::Api,
            }))
        }
        // v1 kept personal fields in the clear; v2 seals them. Same shape: the
        // clear value reads as is (and is masked once the user is forgotten).
        ("UserRegistered", 1) => {
            let old: published::user_registered_v1::UserRegistered = serde_json::from_value(payload).map_err(wrap)?;
            Ok(Event::UserRegistered(UserRegistered {
                user_id: old.user_id,
                email: old.email,
                display_name: old.display_name,
            }))
        }
        ("LoginFailed", 1) => {
            let old: published::login_failed_v1::LoginFailed = serde_json::from_value(payload).map_err(wrap)?;
            Ok(Event::LoginFailed(LoginFailed { user_id: old.user_id, email: old.email, reason: old.reason }))
        }
        _ => Err(EventDecodeError::UnknownType { event_type: event_type.to_owned(), schema_version }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_transfer_reads_as_today_s_type() {
        let id = Uuid::new_v4();
        let payload = serde_json::json!({
            "transfer_id": id, "from_account": id, "to_account": id, "amount": "1.50",
            "currency": "USD", "kind": "withdrawal", "reference": null
        });
        let Event::TransferRecorded(t) = Event::from_stored("TransferRecorded", 1, payload).unwrap() else {
            panic!("a transfer");
        };
        assert_eq!(t.kind, TransferKind::Withdrawal);
        assert_eq!(t.amount, Decimal::new(150, 2));
        assert_eq!(t.channel, Channel::Api, "old events read as api");
        let v1_refuses_new_kinds = serde_json::json!({
            "transfer_id": id, "from_account": id, "to_account": id, "amount": "1.50",
            "currency": "USD", "kind": "fee", "reference": null
        });
        assert!(Event::from_stored("TransferRecorded", 1, v1_refuses_new_kinds).is_err());
        assert!(Event::from_stored("TransferRecorded", 3, serde_json::json!({})).is_err());
    }
}
