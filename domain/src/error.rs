use rust_decimal::Decimal;
use uuid::Uuid;

/// Why a command was refused. Each variant is a business answer, not a fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DomainError {
    #[error("{field} {message}")]
    Validation { field: String, message: String },
    #[error("account {0} does not exist or is not yours")]
    AccountNotFound(Uuid),
    #[error("account {0} is already open")]
    AccountAlreadyOpened(Uuid),
    #[error("user {0} is already registered")]
    UserAlreadyRegistered(Uuid),
    #[error("account {account} has {available} available, {requested} requested")]
    InsufficientFunds { account: Uuid, available: Decimal, requested: Decimal },
    // The other account may be someone else's: its currency is not named.
    #[error("account {from_account} is in {from_currency}; account {to_account} is in another currency")]
    CurrencyMismatch { from_account: Uuid, from_currency: String, to_account: Uuid, to_currency: String },
    #[error("a transfer needs two different accounts")]
    SameAccount,
    #[error("account {0} is frozen")]
    AccountFrozen(Uuid),
    #[error("account {0} is already frozen")]
    AccountAlreadyFrozen(Uuid),
    #[error("account {0} is not frozen")]
    AccountNotFrozen(Uuid),
    #[error("user {0} does not exist")]
    UserNotFound(Uuid),
    #[error("user {0} is already blocked")]
    UserAlreadyBlocked(Uuid),
    #[error("user {0} is not blocked")]
    UserNotBlocked(Uuid),
    #[error("two-factor authentication is already on")]
    TwoFactorAlreadyEnabled,
    #[error("two-factor authentication is not on")]
    TwoFactorNotEnabled,
    #[error("hold {0} does not exist or is not yours")]
    HoldNotFound(Uuid),
    #[error("hold {0} is no longer pending (captured, released or expired)")]
    HoldNotPending(Uuid),
    #[error("order {0} does not exist or is not yours")]
    OrderNotFound(Uuid),
    #[error("order {0} is not {1}")]
    OrderNotInStatus(Uuid, &'static str),
    #[error("refunds would exceed the captured {captured}: {refunded} already refunded, {requested} requested")]
    RefundExceedsCaptured { captured: Decimal, refunded: Decimal, requested: Decimal },
    /// One item of an all-or-none batch was refused, so the whole batch was.
    #[error("transfers[{index}]: {error}")]
    BatchItem { index: usize, error: Box<DomainError> },
}

impl DomainError {
    pub fn validation(field: &str, message: impl Into<String>) -> DomainError {
        DomainError::Validation { field: field.to_owned(), message: message.into() }
    }
}
