//! Orders paid from balances (the shop flow): create, cancel, accept, refund, read.

use super::accounts::{command_envelope, run};
use super::holds::EmptyRequest;
use super::{money, path_id};
use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{CommandRequest, PathParam, QueryParams, ReadAfter};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use ledger_commands::LedgerCommand;
use ledger_domain::events::Role;
use ledger_projections::orders::{self, OrderView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

pub fn order_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "order-not-found", "no such order is visible to you")
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// The customer's account that pays.
    pub account_id: Uuid,
    /// The merchant's account that is paid.
    pub merchant_account: Uuid,
    pub amount: String,
    pub description: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub amount: String,
}

#[utoipa::path(post, path = "/v1/orders", tag = "orders", request_body = CreateOrderRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "{order_id, status: NEW, position}"), (status = 404, description = "account-not-found"), (status = 422, description = "validation, currency-mismatch")))]
pub async fn create(
    State(state): State<AppState>,
    request: CommandRequest<CreateOrderRequest>,
) -> Result<Response, Problem> {
    let envelope = command_envelope(&request);
    let CreateOrderRequest { account_id, merchant_account, amount, description } = request.body;
    run(&state, envelope, LedgerCommand::PlaceOrder { account_id, merchant_account, amount, description }).await
}

#[utoipa::path(post, path = "/v1/orders/{id}/cancel", tag = "orders", params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "cancelled; the hold released"), (status = 409, description = "order-state-conflict (not NEW)"), (status = 404, description = "order-not-found")))]
pub async fn cancel(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<EmptyRequest>,
) -> Result<Response, Problem> {
    let order_id = path_id(&id, order_not_found)?;
    run(&state, command_envelope(&request), LedgerCommand::CancelOrder { order_id }).await
}

#[utoipa::path(post, path = "/v1/orders/{id}/accept", tag = "orders", params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "captured; FINISHED"), (status = 409, description = "order-state-conflict"), (status = 404, description = "order-not-found")))]
pub async fn accept(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<EmptyRequest>,
) -> Result<Response, Problem> {
    let order_id = path_id(&id, order_not_found)?;
    run(&state, command_envelope(&request), LedgerCommand::AcceptOrder { order_id }).await
}

#[utoipa::path(post, path = "/v1/orders/{id}/refunds", tag = "orders", request_body = RefundRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "{order_id, transfer_id, amount, position}"), (status = 422, description = "refund-exceeds-captured, insufficient-funds"), (status = 404, description = "order-not-found")))]
pub async fn refund(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<RefundRequest>,
) -> Result<Response, Problem> {
    let order_id = path_id(&id, order_not_found)?;
    // The merchant's owner refunds; so may an admin (an admin action, needing a session).
    let as_admin = request.user.role == Role::Admin && authorize(&request.user, Action::Admin).is_ok();
    let amount = request.body.amount.clone();
    run(&state, command_envelope(&request), LedgerCommand::RefundOrder { order_id, amount, as_admin }).await
}

#[derive(Serialize, ToSchema)]
pub struct HistoryItem {
    pub event_type: String,
    /// The order's status after this step.
    pub status: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct OrderResponse {
    pub order_id: Uuid,
    /// NEW, FINISHED or CANCELLED.
    pub status: String,
    pub cancel_reason: Option<String>,
    pub account_id: Uuid,
    pub merchant_account: Uuid,
    pub amount: String,
    pub currency: String,
    pub description: String,
    pub hold_id: Option<Uuid>,
    pub captured: String,
    pub refunded: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub position: i64,
    pub history: Vec<HistoryItem>,
}

async fn response(state: &AppState, o: OrderView) -> Result<OrderResponse, Problem> {
    let history = orders::history(&state.pool, o.order_id)
        .await?
        .into_iter()
        .map(|h| HistoryItem {
            event_type: h.event_type,
            status: h.status,
            detail: h.detail,
            recorded_at: h.recorded_at,
            position: h.position,
        })
        .collect();
    Ok(OrderResponse {
        amount: money(o.amount, &o.currency),
        captured: money(o.captured, &o.currency),
        refunded: money(o.refunded, &o.currency),
        order_id: o.order_id,
        status: o.status,
        cancel_reason: o.cancel_reason,
        account_id: o.account_id,
        merchant_account: o.merchant_account,
        currency: o.currency,
        description: o.description,
        hold_id: o.hold_id,
        created_at: o.created_at,
        position: o.position,
        history,
    })
}

#[utoipa::path(get, path = "/v1/orders/{id}", tag = "orders", params(("id" = Uuid, Path), ("min_position" = Option<i64>, Query)),
    responses((status = 200, body = OrderResponse), (status = 404, description = "order-not-found")))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    _: ReadAfter,
) -> Result<Json<OrderResponse>, Problem> {
    let order_id = path_id(&id, order_not_found)?;
    let o = orders::order(&state.pool, order_id).await?.ok_or_else(order_not_found)?;
    authorize(&user, Action::Read { owners: &[Some(o.customer_id), o.merchant_owner], hidden: order_not_found })?;
    Ok(Json(response(&state, o).await?))
}

#[derive(Deserialize, IntoParams)]
pub struct OrderListQuery {
    /// NEW, FINISHED or CANCELLED.
    pub status: Option<String>,
    /// `customer` (default): orders you placed; `merchant`: orders to your accounts.
    pub role: Option<String>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct OrderList {
    pub items: Vec<OrderResponse>,
}

#[utoipa::path(get, path = "/v1/orders", tag = "orders", params(OrderListQuery), responses((status = 200, body = OrderList)))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(query): QueryParams<OrderListQuery>,
    _: ReadAfter,
) -> Result<Json<OrderList>, Problem> {
    let status = query.status.as_deref().filter(|s| !s.is_empty());
    if status.is_some_and(|s| !["NEW", "FINISHED", "CANCELLED"].contains(&s)) {
        return Err(Problem::validation("status", "must be NEW, FINISHED or CANCELLED"));
    }
    let mut items = vec![];
    let as_merchant = match query.role.as_deref() {
        None | Some("") | Some("customer") => false,
        Some("merchant") => true,
        Some(_) => return Err(Problem::validation("role", "must be customer or merchant")),
    };
    for o in orders::orders_of(&state.pool, user.user_id, as_merchant, status).await? {
        items.push(response(&state, o).await?);
    }
    Ok(Json(OrderList { items }))
}
