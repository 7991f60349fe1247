//! API keys for service clients: `Authorization: Bearer lk_...`.
//!
//! Creating one takes no Idempotency-Key: the answer holds the key, which is
//! stored only as a hash and so cannot be replayed. A lost answer means
//! revoking that key and creating another.

use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{rate_limit, JsonBody, PathParam};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ledger_commands::identity::ApiKeyView;
use ledger_domain::events::ApiScope;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub name: String,
    /// "read" (GET requests) and/or "write" (commands).
    #[schema(value_type = Vec<String>)]
    pub scopes: Vec<ApiScope>,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyItem {
    pub key_id: Uuid,
    pub name: String,
    #[schema(value_type = Vec<String>)]
    pub scopes: Vec<ApiScope>,
    /// The key's first characters, to tell keys apart.
    pub key_prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<ApiKeyView> for ApiKeyItem {
    fn from(k: ApiKeyView) -> Self {
        ApiKeyItem {
            key_id: k.key_id,
            name: k.name,
            scopes: k.scopes,
            key_prefix: k.key_prefix,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// The secret, shown this once; send it as `Authorization: Bearer lk_...`.
    pub key: String,
    #[serde(flatten)]
    pub item: ApiKeyItem,
    pub position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub items: Vec<ApiKeyItem>,
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey), (status = 422, description = "validation")))]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreatedApiKey>), Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let (created, position) = state.ledger.create_api_key(user.user_id, &body.name, body.scopes, &user.client).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { key: created.key, item: created.view.into(), position })))
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys", responses((status = 200, body = ApiKeyList)))]
pub async fn list(State(state): State<AppState>, user: AuthUser) -> Result<Json<ApiKeyList>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    let items = state.ledger.api_keys(user.user_id).await?.into_iter().map(ApiKeyItem::from).collect();
    Ok(Json(ApiKeyList { items }))
}

fn api_key_not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "api-key-not-found", "no such API key is yours")
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = super::auth::PositionResponse), (status = 404, description = "api-key-not-found")))]
pub async fn revoke(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
) -> Result<Json<super::auth::PositionResponse>, Problem> {
    authorize(&user, Action::ManageOwnCredentials)?;
    rate_limit(&state, &user)?;
    let key_id = super::path_id(&id, api_key_not_found)?;
    let position = state.ledger.revoke_api_key(user.user_id, key_id, &user.client).await?;
    Ok(Json(super::auth::PositionResponse { position }))
}
