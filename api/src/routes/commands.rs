use crate::auth::AuthUser;
use crate::extract::PathParam;
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Serialize, ToSchema)]
pub struct CommandOutcome {
    pub idempotency_key: String,
    pub command_id: Uuid,
    /// The HTTP status first returned.
    pub status: u16,
    /// The body first returned.
    #[schema(value_type = Object)]
    pub response: serde_json::Value,
    pub position: Option<i64>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

#[utoipa::path(get, path = "/v1/commands/{key}", tag = "commands",
    params(("key" = String, Path, description = "The Idempotency-Key the command was sent with")),
    responses((status = 200, body = CommandOutcome), (status = 404, description = "command-not-found")))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(key): PathParam,
) -> Result<Json<CommandOutcome>, Problem> {
    let record = state.ledger.recorded_outcome(user.user_id, &key).await?.ok_or_else(|| {
        Problem::new(StatusCode::NOT_FOUND, "command-not-found", "no command was recorded under this key")
    })?;
    Ok(Json(CommandOutcome {
        idempotency_key: record.idempotency_key,
        command_id: record.command_id,
        status: record.status as u16,
        response: record.response,
        position: record.position,
        recorded_at: record.recorded_at,
    }))
}
