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
    /// The email as normalised, or as sent if it was not a valid address (truncated).
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
    ($($name:ident => $category:literal),+ $(,)?) => {
        /// Every event the ledger records.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Event {
            $($name($name),)+
        }

        /// Every event type and version the ledger has ever published.
        pub fn event_types() -> Vec<EventTypeInfo> {
            vec![$(EventTypeInfo {
                category: $category,
                event_type: stringify!($name),
                schema_version: 1,
                schema: || schemars::schema_for!($name),
            },)+]
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
                1
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
                    $((stringify!($name), 1) => serde_json::from_value(payload).map(Event::$name).map_err(wrap),)+
                    _ => Err(EventDecodeError::UnknownType { event_type: event_type.to_owned(), schema_version }),
                }
            }
        }
    };
}

ledger_events! {
    UserRegistered => "user",
    RoleChanged => "user",
    UserBlocked => "user",
    UserUnblocked => "user",
    PasswordChanged => "user",
    TwoFactorEnabled => "user",
    TwoFactorDisabled => "user",
    AccountOpened => "account",
    TransferRecorded => "account",
    AccountFrozen => "account",
    AccountUnfrozen => "account",
    UserLoggedIn => "security",
    LoginFailed => "security",
    LoggedOut => "security",
    SessionRevoked => "security",
    RefreshTokenReused => "security",
    ApiKeyCreated => "security",
    ApiKeyRevoked => "security",
}
