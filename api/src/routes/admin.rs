//! The admin API. Reads need the support or admin role; actions need admin,
//! a login session and an Idempotency-Key, and each is an event carrying its
//! reason.

use super::accounts::{command_envelope, run, AccountResponse};
use super::{account_not_found, path_id};
use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{CommandRequest, PathParam, QueryParams};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use ledger_commands::identity::UserSummary;
use ledger_commands::LedgerCommand;
use ledger_domain::events::Role;
use ledger_projections::balances;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

fn user_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "user-not-found", "no such user")
}

#[derive(Deserialize, IntoParams)]
pub struct UserQuery {
    /// A fragment of the email address.
    pub query: Option<String>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct UserItem {
    pub user_id: Uuid,
    pub email: String,
    /// "user", "support" or "admin".
    pub role: String,
    pub blocked: bool,
    pub two_factor: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<UserSummary> for UserItem {
    fn from(u: UserSummary) -> Self {
        UserItem {
            user_id: u.user_id,
            email: u.email,
            role: u.role.as_str().to_owned(),
            blocked: u.blocked,
            two_factor: u.two_factor,
            created_at: u.created_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<UserItem>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", params(UserQuery),
    responses((status = 200, body = UserPage), (status = 403, description = "forbidden")))]
pub async fn users(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(query): QueryParams<UserQuery>,
) -> Result<Json<UserPage>, Problem> {
    authorize(&user, Action::StaffRead)?;
    let limit = super::page_limit(query.limit)?;
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            Some(Uuid::parse_str(c).map_err(|_| Problem::validation("cursor", "is not a cursor this API returned"))?)
        }
    };
    let found = state.ledger.users(query.query.as_deref().unwrap_or(""), after, limit).await?;
    let next_cursor = (found.len() as i64 == limit).then(|| found.last().map(|u| u.user_id.to_string())).flatten();
    Ok(Json(UserPage { items: found.into_iter().map(UserItem::from).collect(), next_cursor }))
}

#[derive(Serialize, ToSchema)]
pub struct UserDetail {
    #[serde(flatten)]
    pub user: UserItem,
    pub accounts: Vec<AccountResponse>,
}

#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin", params(("id" = Uuid, Path)),
    responses((status = 200, body = UserDetail), (status = 404, description = "user-not-found")))]
pub async fn user(
    State(state): State<AppState>,
    caller: AuthUser,
    PathParam(id): PathParam,
) -> Result<Json<UserDetail>, Problem> {
    authorize(&caller, Action::StaffRead)?;
    let user_id = path_id(&id, user_not_found)?;
    let found = state.ledger.user(user_id).await?.ok_or_else(user_not_found)?;
    let accounts = balances::accounts_of(&state.pool, user_id).await?;
    Ok(Json(UserDetail { user: found.into(), accounts: accounts.into_iter().map(AccountResponse::from).collect() }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonRequest {
    /// Required; recorded in the event.
    pub reason: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// "user", "support" or "admin".
    pub role: String,
    pub reason: Option<String>,
}

async fn admin_command<T>(
    state: &AppState,
    request: &CommandRequest<T>,
    command: LedgerCommand,
) -> Result<Response, Problem> {
    authorize(&request.user, Action::Admin)?;
    run(state, command_envelope(request), command).await
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/block", tag = "admin", request_body = ReasonRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "blocked"), (status = 404, description = "user-not-found"), (status = 409, description = "user-already-blocked")))]
pub async fn block(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<ReasonRequest>,
) -> Result<Response, Problem> {
    let user_id = path_id(&id, user_not_found)?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::BlockUser { user_id, reason }).await
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/unblock", tag = "admin", request_body = ReasonRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "unblocked"), (status = 404, description = "user-not-found"), (status = 409, description = "user-not-blocked")))]
pub async fn unblock(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<ReasonRequest>,
) -> Result<Response, Problem> {
    let user_id = path_id(&id, user_not_found)?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::UnblockUser { user_id, reason }).await
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/role", tag = "admin", request_body = RoleRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "role changed"), (status = 404, description = "user-not-found"), (status = 422, description = "validation")))]
pub async fn change_role(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<RoleRequest>,
) -> Result<Response, Problem> {
    let user_id = path_id(&id, user_not_found)?;
    let role = Role::parse(request.body.role.trim())
        .ok_or_else(|| Problem::validation("role", "must be one of \"user\", \"support\", \"admin\""))?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::ChangeRole { user_id, role, reason }).await
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/forget", tag = "admin", request_body = ReasonRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "forgotten: the personal-data key is destroyed"), (status = 404, description = "user-not-found")))]
pub async fn forget(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<ReasonRequest>,
) -> Result<Response, Problem> {
    let user_id = path_id(&id, user_not_found)?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::ForgetUser { user_id, reason }).await
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/freeze", tag = "admin", request_body = ReasonRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "frozen"), (status = 404, description = "account-not-found"), (status = 409, description = "account-already-frozen")))]
pub async fn freeze(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<ReasonRequest>,
) -> Result<Response, Problem> {
    let account_id = path_id(&id, account_not_found)?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::FreezeAccount { account_id, reason }).await
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/unfreeze", tag = "admin", request_body = ReasonRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, description = "unfrozen"), (status = 404, description = "account-not-found"), (status = 409, description = "account-not-frozen")))]
pub async fn unfreeze(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<ReasonRequest>,
) -> Result<Response, Problem> {
    let account_id = path_id(&id, account_not_found)?;
    let reason = request.body.reason.clone();
    admin_command(&state, &request, LedgerCommand::UnfreezeAccount { account_id, reason }).await
}
