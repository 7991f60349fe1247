//! Errors as `application/problem+json` (RFC 9457): `type`, `title`,
//! `status`, `detail`. The last path segment of `type` is the stable code
//! clients match on.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
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
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem { status, code, detail: detail.into(), extensions: None }
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
        "method-not-allowed" => "Method not allowed",
        "service-unavailable" => "A backing service is unavailable",
        _ => "Internal error",
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
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
