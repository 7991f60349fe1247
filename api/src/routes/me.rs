//! The caller's own profile and security activity.

use crate::auth::AuthUser;
use crate::extract::{QueryParams, ReadAfter};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ledger_projections::activity;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Serialize, ToSchema)]
pub struct Me {
    pub user_id: Uuid,
    pub email: String,
    /// "user", "support" or "admin".
    pub role: String,
    pub two_factor: bool,
}

#[utoipa::path(get, path = "/v1/me", tag = "me", responses((status = 200, body = Me)))]
pub async fn me(State(state): State<AppState>, user: AuthUser) -> Result<Json<Me>, Problem> {
    let found = state
        .ledger
        .user(user.user_id)
        .await?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "user-not-found", "this user no longer exists"))?;
    Ok(Json(Me {
        user_id: found.user_id,
        email: found.email,
        role: found.role.as_str().to_owned(),
        two_factor: found.two_factor,
    }))
}

#[derive(Deserialize, IntoParams)]
pub struct ActivityQuery {
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ActivityItem {
    /// E.g. UserLoggedIn, LoginFailed, PasswordChanged, UserBlocked.
    pub event_type: String,
    /// The event's fields, without the user id.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// Who did it: the user, an admin, or the nil id for the system.
    pub actor_id: Option<Uuid>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ActivityPage {
    pub items: Vec<ActivityItem>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/me/activity", tag = "me", params(ActivityQuery),
    responses((status = 200, body = ActivityPage)))]
pub async fn activity(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(query): QueryParams<ActivityQuery>,
    _: ReadAfter,
) -> Result<Json<ActivityPage>, Problem> {
    let limit = super::page_limit(query.limit)?;
    let before = super::position_cursor(query.cursor.as_deref())?;
    let rows = activity::of_user(&state.pool, user.user_id, limit, before).await?;
    let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.position.to_string())).flatten();
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        // Personal fields are stored sealed; they are opened here, or read `[erased]`.
        let mut detail = r.detail;
        let mut sealed = detail.clone();
        sealed["user_id"] = serde_json::Value::String(user.user_id.to_string());
        if let Some(serde_json::Value::Object(open)) = state.ledger.reveal_personal(&r.event_type, &sealed).await? {
            for (field, value) in open {
                detail[field] = value;
            }
        }
        items.push(ActivityItem {
            event_type: r.event_type,
            detail,
            actor_id: r.actor_id,
            ip: r.client_ip,
            user_agent: r.user_agent,
            recorded_at: r.recorded_at,
            position: r.position,
        });
    }
    Ok(Json(ActivityPage { items, next_cursor }))
}
