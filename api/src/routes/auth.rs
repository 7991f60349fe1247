//! Registration, login, sessions, password and two-factor.
//!
//! These routes take no Idempotency-Key: their answers carry secrets (tokens,
//! recovery codes) that must not be stored for replay, and repeating them is
//! harmless or refused (a reused refresh token revokes its session).

use crate::access::{authorize, Action};
use crate::auth::{check_csrf, cleared_cookies, cookie, session_cookies, AuthUser, Client, REFRESH_COOKIE};
use crate::extract::{rate_limit, rate_limit_client, JsonBody, PathParam};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ledger_commands::identity::SessionGrant;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub email: String,
    /// At least 10 characters.
    pub password: String,
    pub display_name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RegisterResponse {
    pub user_id: Uuid,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// The current TOTP code, or a recovery code, when two-factor is on.
    pub totp: Option<String>,
    /// Browser mode: tokens come as HttpOnly cookies instead of in the body.
    #[serde(default)]
    pub cookies: bool,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// "Bearer", or "Cookie" in browser mode.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Bearer mode only: opaque, single use, rotates on every refresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: i64,
    /// Cookie mode only: echo it in X-CSRF-Token on unsafe requests (it is also the `ledger_csrf` cookie).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// Bearer mode; browsers send the `ledger_refresh` cookie instead.
    pub refresh_token: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PositionResponse {
    /// The log position of the event that recorded it.
    pub position: i64,
}

#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = RegisterResponse), (status = 409, description = "email-taken"), (status = 422, description = "validation")))]
pub async fn register(
    State(state): State<AppState>,
    Client(client): Client,
    JsonBody(body): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), Problem> {
    rate_limit_client(&state, &client)?;
    let (user_id, _) = state.ledger.register(body.email, body.password, body.display_name, &client).await?;
    Ok((StatusCode::CREATED, Json(RegisterResponse { user_id })))
}

/// The answer to a login or refresh, in bearer or cookie mode.
fn session_response(state: &AppState, grant: SessionGrant, cookies: bool) -> Result<Response, Problem> {
    let (access_token, expires_in) = state.jwt.issue(grant.user_id, grant.session_id)?;
    if !cookies {
        return Ok(Json(LoginResponse {
            access_token: Some(access_token),
            token_type: "Bearer",
            expires_in,
            refresh_token: Some(grant.refresh_token),
            refresh_expires_in: grant.refresh_expires_in,
            csrf_token: None,
        })
        .into_response());
    }
    let csrf = state.jwt.csrf_token(grant.session_id);
    let mut response = Json(LoginResponse {
        access_token: None,
        token_type: "Cookie",
        expires_in,
        refresh_token: None,
        refresh_expires_in: grant.refresh_expires_in,
        csrf_token: Some(csrf.clone()),
    })
    .into_response();
    for value in
        session_cookies(&access_token, &grant.refresh_token, grant.refresh_expires_in, &csrf, state.secure_cookies)
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse),
        (status = 401, description = "invalid-credentials, two-factor-required or two-factor-invalid"),
        (status = 403, description = "user-blocked"),
        (status = 429, description = "too-many-attempts, with Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    Client(client): Client,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Response, Problem> {
    rate_limit_client(&state, &client)?;
    let grant = state.ledger.login(&body.email, body.password, body.totp, &client).await?;
    session_response(&state, grant, body.cookies)
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = LoginResponse),
        (status = 401, description = "refresh-token-reused (the session is revoked) or unauthorized"),
        (status = 403, description = "csrf or user-blocked")))]
pub async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
    Client(client): Client,
    JsonBody(body): JsonBody<RefreshRequest>,
) -> Result<Response, Problem> {
    rate_limit_client(&state, &client)?;
    let (token, from_cookie) = refresh_token(&state, &headers, body.refresh_token).await?;
    let grant = state.ledger.refresh(&token, &client).await?;
    session_response(&state, grant, from_cookie)
}

/// The refresh token from the body, or from the cookie (with the CSRF check
/// against the token's session).
async fn refresh_token(
    state: &AppState,
    headers: &HeaderMap,
    from_body: Option<String>,
) -> Result<(String, bool), Problem> {
    if let Some(token) = from_body.filter(|t| !t.trim().is_empty()) {
        return Ok((token, false));
    }
    let Some(token) = cookie(headers, REFRESH_COOKIE) else {
        return Err(Problem::validation("refresh_token", "is required (or the ledger_refresh cookie)"));
    };
    let session_id = state.ledger.session_of_refresh_token(token).await?.map(|(_, s)| s).unwrap_or_default();
    check_csrf(headers, &state.jwt.csrf_token(session_id))?;
    Ok((token.to_owned(), true))
}

fn with_cleared_cookies(state: &AppState, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    for value in cleared_cookies(state.secure_cookies) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth",
    responses((status = 200, body = PositionResponse), (status = 401, description = "unauthorized")))]
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Client(client): Client,
    caller: Result<AuthUser, Problem>,
) -> Result<Response, Problem> {
    // An expired access token should not stop a logout: the refresh token names the session too.
    let (user_id, session_id) = match caller {
        Ok(user) => {
            authorize(&user, Action::ManageOwnCredentials)?;
            (user.user_id, user.session_id())
        }
        Err(problem) => {
            let Ok((token, _)) = refresh_token(&state, &headers, None).await else { return Err(problem) };
            match state.ledger.session_of_refresh_token(&token).await? {
                Some((user_id, session_id)) => (user_id, Some(session_id)),
                None => return Err(problem),
            }
        }
    };
    let position = state.ledger.logout(user_id, session_id, false, &client).await?;
    Ok(with_cleared_cookies(&state, Json(PositionResponse { position })))
}

#[utoipa::path(post, path = "/v1/auth/logout-all", tag = "auth",
    responses((status = 200, body = PositionResponse), (status = 401, description = "unauthorized")))]
pub async fn logout_all(State(state): State<AppState>, user: AuthUser) -> Result<Response, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let position = state.ledger.logout(user.user_id, user.session_id(), true, &user.client).await?;
    Ok(with_cleared_cookies(&state, Json(PositionResponse { position })))
}

#[derive(Serialize, ToSchema)]
pub struct SessionItem {
    pub session_id: Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The last login or refresh.
    pub last_used_at: chrono::DateTime<chrono::Utc>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    /// The session this request belongs to.
    pub current: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub items: Vec<SessionItem>,
}

#[utoipa::path(get, path = "/v1/auth/sessions", tag = "auth", responses((status = 200, body = SessionList)))]
pub async fn sessions(State(state): State<AppState>, user: AuthUser) -> Result<Json<SessionList>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    let current = user.session_id();
    let items = state
        .ledger
        .sessions(user.user_id)
        .await?
        .into_iter()
        .map(|s| SessionItem {
            current: Some(s.session_id) == current,
            session_id: s.session_id,
            created_at: s.created_at,
            last_used_at: s.last_used_at,
            user_agent: s.user_agent,
            ip: s.client_ip,
        })
        .collect();
    Ok(Json(SessionList { items }))
}

fn session_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "session-not-found", "no such session is yours")
}

#[utoipa::path(delete, path = "/v1/auth/sessions/{id}", tag = "auth", params(("id" = Uuid, Path)),
    responses((status = 200, body = PositionResponse), (status = 404, description = "session-not-found")))]
pub async fn revoke_session(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
) -> Result<Json<PositionResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let session_id = super::path_id(&id, session_not_found)?;
    let position = state.ledger.revoke_own_session(user.user_id, session_id, &user.client).await?;
    Ok(Json(PositionResponse { position }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChangeRequest {
    pub current_password: String,
    /// At least 10 characters.
    pub new_password: String,
}

#[utoipa::path(post, path = "/v1/auth/password", tag = "auth", request_body = PasswordChangeRequest,
    responses((status = 200, body = PositionResponse), (status = 403, description = "invalid-credentials (the current password is wrong)"), (status = 422, description = "validation")))]
pub async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<PasswordChangeRequest>,
) -> Result<Json<PositionResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let position = state
        .ledger
        .change_password(user.user_id, user.session_id(), body.current_password, body.new_password, &user.client)
        .await?;
    Ok(Json(PositionResponse { position }))
}

#[derive(Serialize, ToSchema)]
pub struct TwoFactorSetupResponse {
    /// Base32 TOTP secret (SHA-1, 6 digits, 30 s), shown once.
    pub secret: String,
    pub otpauth_uri: String,
}

#[utoipa::path(post, path = "/v1/auth/2fa/setup", tag = "auth",
    responses((status = 200, body = TwoFactorSetupResponse), (status = 409, description = "two-factor-already-enabled")))]
pub async fn two_factor_setup(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<TwoFactorSetupResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let setup = state.ledger.two_factor_setup(user.user_id).await?;
    Ok(Json(TwoFactorSetupResponse { secret: setup.secret_base32, otpauth_uri: setup.otpauth_uri }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorCode {
    pub code: String,
}

#[derive(Serialize, ToSchema)]
pub struct TwoFactorConfirmResponse {
    /// Ten one-time codes, shown once; each works instead of a TOTP code once.
    pub recovery_codes: Vec<String>,
    pub position: i64,
}

#[utoipa::path(post, path = "/v1/auth/2fa/confirm", tag = "auth", request_body = TwoFactorCode,
    responses((status = 200, body = TwoFactorConfirmResponse), (status = 401, description = "two-factor-invalid"), (status = 409, description = "two-factor-not-set-up or two-factor-already-enabled")))]
pub async fn two_factor_confirm(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<TwoFactorCode>,
) -> Result<Json<TwoFactorConfirmResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let (recovery_codes, position) = state.ledger.two_factor_confirm(user.user_id, &body.code, &user.client).await?;
    Ok(Json(TwoFactorConfirmResponse { recovery_codes, position }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorDisableRequest {
    pub password: String,
    /// A current TOTP code or an unused recovery code.
    pub code: String,
}

#[utoipa::path(post, path = "/v1/auth/2fa/disable", tag = "auth", request_body = TwoFactorDisableRequest,
    responses((status = 200, body = PositionResponse), (status = 401, description = "two-factor-invalid"), (status = 403, description = "invalid-credentials")))]
pub async fn two_factor_disable(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<TwoFactorDisableRequest>,
) -> Result<Json<PositionResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let position = state.ledger.two_factor_disable(user.user_id, body.password, &body.code, &user.client).await?;
    Ok(Json(PositionResponse { position }))
}
