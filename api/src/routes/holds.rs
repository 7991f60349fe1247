//! Holds (two-phase transfers).

use super::accounts::run;
use super::{account_not_found, money, path_id};
use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{PathParam, QueryParams, ReadAfter, WriteChecksSession};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use ledger_commands::LedgerCommand;
use ledger_projections::balances::{self, HoldView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

pub fn hold_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "hold-not-found", "no such hold is visible to you")
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHoldRequest {
    pub from_account: Uuid,
    pub to_account: Uuid,
    /// Decimal string, e.g. "12.30".
    pub amount: String,
    /// Default 900 (15 minutes), at most 2592000 (30 days).
    pub expires_in_seconds: Option<i64>,
    pub reference: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Up to the held amount; the whole hold when absent. The rest is released.
    pub amount: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

#[utoipa::path(post, path = "/v1/holds", tag = "holds", request_body = PlaceHoldRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "{hold_id, position, expires_at}"), (status = 422, description = "insufficient-funds, currency-mismatch, same-account, account-frozen or validation"), (status = 404, description = "account-not-found")))]
pub async fn place(
    State(state): State<AppState>,
    request: WriteChecksSession<PlaceHoldRequest>,
) -> Result<Response, Problem> {
    let WriteChecksSession { envelope, body } = request;
    let PlaceHoldRequest { from_account, to_account, amount, expires_in_seconds, reference } = body;
    run(&state, envelope, LedgerCommand::PlaceHold { from_account, to_account, amount, expires_in_seconds, reference })
        .await
}

#[utoipa::path(post, path = "/v1/holds/{id}/capture", tag = "holds", request_body = CaptureRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "{hold_id, transfer_id, amount, released, position}"), (status = 422, description = "hold-not-pending or validation"), (status = 404, description = "hold-not-found")))]
pub async fn capture(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: WriteChecksSession<CaptureRequest>,
) -> Result<Response, Problem> {
    let hold_id = path_id(&id, hold_not_found)?;
    run(&state, request.envelope, LedgerCommand::CaptureHold { hold_id, amount: request.body.amount }).await
}

#[utoipa::path(post, path = "/v1/holds/{id}/release", tag = "holds",
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "{hold_id, status, position}"), (status = 422, description = "hold-not-pending"), (status = 404, description = "hold-not-found")))]
pub async fn release(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: WriteChecksSession<EmptyRequest>,
) -> Result<Response, Problem> {
    let hold_id = path_id(&id, hold_not_found)?;
    run(&state, request.envelope, LedgerCommand::ReleaseHold { hold_id }).await
}

#[derive(Serialize, ToSchema)]
pub struct HoldResponse {
    pub hold_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: String,
    pub captured_amount: String,
    pub currency: String,
    /// pending, captured, released or expired.
    pub status: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub reference: Option<String>,
    pub order_id: Option<Uuid>,
    pub placed_at: chrono::DateTime<chrono::Utc>,
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
    pub position: i64,
}

impl From<HoldView> for HoldResponse {
    fn from(h: HoldView) -> Self {
        HoldResponse {
            amount: money(h.amount, &h.currency),
            captured_amount: money(h.captured_amount, &h.currency),
            hold_id: h.hold_id,
            from_account: h.from_account,
            to_account: h.to_account,
            currency: h.currency,
            status: h.status,
            expires_at: h.expires_at,
            reference: h.reference,
            order_id: h.order_id,
            placed_at: h.placed_at,
            resolved_at: h.resolved_at,
            position: h.position,
        }
    }
}

/// The owners of a hold's two accounts.
async fn parties(state: &AppState, h: &HoldView) -> Result<[Option<Uuid>; 2], Problem> {
    let from = balances::account(&state.pool, h.from_account).await?.and_then(|a| a.owner_id);
    let to = balances::account(&state.pool, h.to_account).await?.and_then(|a| a.owner_id);
    Ok([from, to])
}

#[utoipa::path(get, path = "/v1/holds/{id}", tag = "holds", params(("id" = Uuid, Path), ("min_position" = Option<i64>, Query)),
    responses((status = 200, body = HoldResponse), (status = 404, description = "hold-not-found")))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    _: ReadAfter,
) -> Result<Json<HoldResponse>, Problem> {
    let hold_id = path_id(&id, hold_not_found)?;
    let h = balances::hold(&state.pool, hold_id).await?.ok_or_else(hold_not_found)?;
    authorize(&user, Action::Read { owners: &parties(&state, &h).await?, hidden: hold_not_found })?;
    Ok(Json(h.into()))
}

#[derive(Deserialize, IntoParams)]
pub struct HoldListQuery {
    /// pending, captured, released or expired.
    pub status: Option<String>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HoldList {
    pub items: Vec<HoldResponse>,
}

#[utoipa::path(get, path = "/v1/accounts/{id}/holds", tag = "holds", params(("id" = Uuid, Path), HoldListQuery),
    responses((status = 200, body = HoldList), (status = 404, description = "account-not-found")))]
pub async fn of_account(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<HoldListQuery>,
    _: ReadAfter,
) -> Result<Json<HoldList>, Problem> {
    let account_id = path_id(&id, account_not_found)?;
    let account = balances::account(&state.pool, account_id).await?.ok_or_else(account_not_found)?;
    authorize(&user, Action::Read { owners: &[account.owner_id], hidden: account_not_found })?;
    let status = query.status.as_deref().filter(|s| !s.is_empty());
    if status.is_some_and(|s| !["pending", "captured", "released", "expired"].contains(&s)) {
        return Err(Problem::validation("status", "must be pending, captured, released or expired"));
    }
    let items =
        balances::holds_of(&state.pool, account_id, status).await?.into_iter().map(HoldResponse::from).collect();
    Ok(Json(HoldList { items }))
}
