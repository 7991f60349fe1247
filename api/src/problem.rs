//! Errors as `application/problem+json` (RFC 9457): `type`, `title`,
//! `status`, `detail`. The last path segment of `type` is the stable code
//! clients match on.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ledger_commands::store::StoreError;
use ledger_commands::CommandError;
use ledger_domain::DomainError;
use serde_json::{json, Value};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One problem answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Extra members, e.g. the offending `field`.
    pub extensions: Option<Value>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem { status, code, detail: detail.into(), extensions: None, retry_after: None }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after = Some(seconds);
        self
    }

    pub fn validation(field: &str, message: impl std::fmt::Display) -> Problem {
        Problem {
            extensions: Some(json!({ "field": field })),
            ..Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", format!("{field} {message}"))
        }
    }

    pub fn unauthorized(detail: &str) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("/problems/{}", self.code),
            "title": title(self.code),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let (Some(Value::Object(ext)), Value::Object(map)) = (&self.extensions, &mut body) {
            for (k, v) in ext {
                map.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        body
    }
}

fn title(code: &str) -> &'static str {
    match code {
        "validation" => "The request is not valid",
        "malformed-json" => "The body is not valid JSON",
        "payload-too-large" => "The body is too large",
        "unsupported-media-type" => "The body must be application/json",
        "unauthorized" => "Authentication is required",
        "invalid-credentials" => "Wrong email or password",
        "email-taken" => "The email address is already registered",
        "idempotency-key-required" => "An Idempotency-Key header is required",
        "idempotency-key-invalid" => "The Idempotency-Key header is not valid",
        "idempotency-key-reuse" => "The Idempotency-Key was used for a different request",
        "account-not-found" => "Account not found",
        "transfer-not-found" => "Transfer not found",
        "command-not-found" => "No command was recorded under this key",
        "insufficient-funds" => "Insufficient funds",
        "currency-mismatch" => "The accounts are in different currencies",
        "same-account" => "A transfer needs two different accounts",
        "account-exists" => "The account already exists",
        "concurrency-conflict" => "Concurrent changes collided",
        "projection-lag" => "The read side has not caught up",
        "not-found" => "Not found",
        "forbidden" => "Not allowed",
        "user-blocked" => "The user is blocked",
        "refresh-token-reused" => "The refresh token was already used",
        "csrf" => "The CSRF token is missing or wrong",
        "insufficient-scope" => "The credential does not allow this",
        "two-factor-required" => "A two-factor code is required",
        "two-factor-invalid" => "The two-factor code is wrong",
        "two-factor-not-set-up" => "Two-factor authentication is not set up",
        "two-factor-already-enabled" => "Two-factor authentication is already on",
        "two-factor-not-enabled" => "Two-factor authentication is not on",
        "too-many-attempts" => "Too many failed attempts",
        "rate-limited" => "Too many requests",
        "timeout" => "The request took too long",
        "account-frozen" => "The account is frozen",
        "account-already-frozen" => "The account is already frozen",
        "account-not-frozen" => "The account is not frozen",
        "user-not-found" => "User not found",
        "user-already-blocked" => "The user is already blocked",
        "user-not-blocked" => "The user is not blocked",
        "session-not-found" => "Session not found",
        "api-key-not-found" => "API key not found",
        "hold-not-found" => "Hold not found",
        "websocket-required" => "This route is a WebSocket",
        "hold-not-pending" => "The hold is no longer pending",
        "order-not-found" => "Order not found",
        "order-state-conflict" => "The order is not in a state that allows this",
        "refund-exceeds-captured" => "Refunds would exceed the captured amount",
        "method-not-allowed" => "Method not allowed",
        "service-unavailable" => "A backing service is unavailable",
        _ => "Internal error",
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The problem for a domain rejection.
pub fn from_domain(e: &DomainError) -> Problem {
    match e {
        DomainError::Validation { field, message } => Problem::validation(field, message),
        DomainError::AccountNotFound(_) => Problem::new(StatusCode::NOT_FOUND, "account-not-found", e.to_string()),
        DomainError::InsufficientFunds { .. } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds", e.to_string())
        }
        DomainError::CurrencyMismatch { .. } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "currency-mismatch", e.to_string())
        }
        DomainError::SameAccount => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "same-account", e.to_string()),
        DomainError::AccountAlreadyOpened(_) => Problem::new(StatusCode::CONFLICT, "account-exists", e.to_string()),
        DomainError::UserAlreadyRegistered(_) => Problem::new(StatusCode::CONFLICT, "email-taken", e.to_string()),
        DomainError::AccountFrozen(_) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "account-frozen", e.to_string())
        }
        DomainError::AccountAlreadyFrozen(_) => {
            Problem::new(StatusCode::CONFLICT, "account-already-frozen", e.to_string())
        }
        DomainError::AccountNotFrozen(_) => Problem::new(StatusCode::CONFLICT, "account-not-frozen", e.to_string()),
        DomainError::UserNotFound(_) => Problem::new(StatusCode::NOT_FOUND, "user-not-found", e.to_string()),
        DomainError::UserAlreadyBlocked(_) => Problem::new(StatusCode::CONFLICT, "user-already-blocked", e.to_string()),
        DomainError::UserNotBlocked(_) => Problem::new(StatusCode::CONFLICT, "user-not-blocked", e.to_string()),
        DomainError::TwoFactorAlreadyEnabled => {
            Problem::new(StatusCode::CONFLICT, "two-factor-already-enabled", e.to_string())
        }
        DomainError::TwoFactorNotEnabled => Problem::new(StatusCode::CONFLICT, "two-factor-not-enabled", e.to_string()),
        DomainError::HoldNotFound(_) => Problem::new(StatusCode::NOT_FOUND, "hold-not-found", e.to_string()),
        DomainError::HoldNotPending(_) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "hold-not-pending", e.to_string())
        }
        DomainError::OrderNotFound(_) => Problem::new(StatusCode::NOT_FOUND, "order-not-found", e.to_string()),
        DomainError::OrderNotInStatus(..) => Problem::new(StatusCode::CONFLICT, "order-state-conflict", e.to_string()),
        DomainError::BatchItem { index, error } => {
            let inner = from_domain(error);
            Problem {
                detail: format!("transfers[{index}]: {}; nothing in the batch was done", inner.detail),
                extensions: Some(json!({ "item": index, "field": format!("transfers[{index}]") })),
                ..inner
            }
        }
        DomainError::RefundExceedsCaptured { .. } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "refund-exceeds-captured", e.to_string())
        }
    }
}

/// Stored with the idempotency record, so a replay answers exactly the same.
pub fn render_rejection(e: &DomainError) -> (u16, Value) {
    let p = from_domain(e);
    (p.status.as_u16(), p.body())
}

impl From<CommandError> for Problem {
    fn from(e: CommandError) -> Problem {
        match e {
            CommandError::IdempotencyKeyReuse => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reuse", e.to_string())
            }
            CommandError::ConcurrencyConflict => {
                Problem::new(StatusCode::CONFLICT, "concurrency-conflict", e.to_string())
            }
            CommandError::EmailTaken => Problem::new(StatusCode::CONFLICT, "email-taken", e.to_string()),
            CommandError::InvalidCredentials => {
                Problem::new(StatusCode::UNAUTHORIZED, "invalid-credentials", e.to_string())
            }
            CommandError::Rejected(d) => from_domain(&d),
            CommandError::Store(s @ StoreError::Invariant(_)) => {
                tracing::error!(error = %s, "command refused");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be completed")
            }
            CommandError::Store(s) => {
                tracing::error!(error = %s, "event store failure");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service-unavailable",
                    "the ledger cannot reach its database; nothing was recorded, retry with the same Idempotency-Key",
                )
            }
            CommandError::Hashing => {
                tracing::error!("password hashing failed");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be completed")
            }
            CommandError::Secret(_) => {
                tracing::error!(
                    "a sealed secret could not be opened; is LEDGER_SECRET_KEY the one it was sealed with?"
                );
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be completed")
            }
            CommandError::TwoFactorRequired => {
                Problem::new(StatusCode::UNAUTHORIZED, "two-factor-required", e.to_string())
            }
            CommandError::TwoFactorInvalid => {
                Problem::new(StatusCode::UNAUTHORIZED, "two-factor-invalid", e.to_string())
            }
            CommandError::TwoFactorNotSetUp => {
                Problem::new(StatusCode::CONFLICT, "two-factor-not-set-up", e.to_string())
            }
            CommandError::UserBlocked => Problem::new(StatusCode::FORBIDDEN, "user-blocked", e.to_string()),
            CommandError::SessionEnded => Problem::unauthorized("the session has ended; log in again"),
            CommandError::TooManyAttempts { retry_after } => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, "too-many-attempts", e.to_string())
                    .with_retry_after(retry_after)
            }
            CommandError::RefreshTokenReused => {
                Problem::new(StatusCode::UNAUTHORIZED, "refresh-token-reused", e.to_string())
            }
            CommandError::RefreshTokenInvalid => Problem::unauthorized("the refresh token is invalid or expired"),
            CommandError::WrongPassword => {
                Problem::new(StatusCode::FORBIDDEN, "invalid-credentials", "the password is wrong")
            }
            CommandError::SessionNotFound => Problem::new(StatusCode::NOT_FOUND, "session-not-found", e.to_string()),
            CommandError::ApiKeyNotFound => Problem::new(StatusCode::NOT_FOUND, "api-key-not-found", e.to_string()),
        }
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Problem {
        tracing::error!(error = %e, "read model query failed");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "the ledger cannot reach its database; retry later",
        )
    }
}
