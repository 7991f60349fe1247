pub mod accounts;
pub mod admin;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod commands;
pub mod health;
pub mod holds;
pub mod me;
pub mod orders;
pub mod transfers;

use crate::problem::Problem;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ledger_commands::Outcome;
use ledger_domain::Currency;
use rust_decimal::Decimal;
use uuid::Uuid;

/// A command's outcome as HTTP: the recorded status and body, marked when replayed.
pub fn outcome_response(outcome: Outcome) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(outcome.body)).into_response();
    if status.is_client_error() || status.is_server_error() {
        response
            .headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static(crate::problem::PROBLEM_CONTENT_TYPE));
    }
    if outcome.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Formats an amount with exactly its currency's minor-unit digits.
pub fn money(value: Decimal, currency: &str) -> String {
    match Currency::from_code(currency) {
        Some(c) => ledger_domain::money::to_minor_units(value, c).to_string(),
        None => value.normalize().to_string(),
    }
}

/// Parses an id from the path; a malformed one names nothing that exists.
pub fn path_id(raw: &str, not_found: fn() -> Problem) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

pub fn account_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "account-not-found", "no such account is visible to you")
}

pub fn transfer_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "transfer-not-found", "no such transfer is visible to you")
}

/// A page size: 1 to 200, 50 when absent.
pub fn page_limit(limit: Option<i64>) -> Result<i64, Problem> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(Problem::validation("limit", "must be between 1 and 200"));
    }
    Ok(limit)
}

/// A `next_cursor` this API returned for a list ordered by a positive number.
pub fn position_cursor(cursor: Option<&str>) -> Result<Option<i64>, Problem> {
    match cursor {
        None | Some("") => Ok(None),
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| Problem::validation("cursor", "is not a cursor this API returned")),
    }
}
