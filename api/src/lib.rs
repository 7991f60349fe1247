//! The HTTP surface: the command API (writes) and the query API (reads).
//! Handlers are thin: extract, call one application function, map the result.

pub mod access;
pub mod auth;
pub mod extract;
pub mod live;
mod openapi;
pub mod problem;
pub mod rate_limit;
mod routes;
pub mod state;

pub use openapi::ApiDoc;
pub use state::{AppState, StateParts};

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use problem::Problem;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

/// Routes that change the ledger.
pub fn command_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/register", post(routes::auth::register))
        .route("/v1/auth/login", post(routes::auth::login))
        .route("/v1/accounts", post(routes::accounts::open))
        .route("/v1/accounts/{id}/deposits", post(routes::accounts::deposit))
        .route("/v1/accounts/{id}/withdrawals", post(routes::accounts::withdraw))
        .route("/v1/transfers", post(routes::transfers::create))
        // Up to 1000 transfers do not fit the general 64 KiB limit.
        .route(
            "/v1/transfers/batch",
            post(routes::transfers::batch).layer(DefaultBodyLimit::max(extract::MAX_BATCH_BODY_BYTES)),
        )
        .route("/v1/auth/refresh", post(routes::auth::refresh))
        .route("/v1/auth/logout", post(routes::auth::logout))
        .route("/v1/auth/logout-all", post(routes::auth::logout_all))
        .route("/v1/auth/sessions/{id}", delete(routes::auth::revoke_session))
        .route("/v1/auth/password", post(routes::auth::change_password))
        .route("/v1/auth/2fa/setup", post(routes::auth::two_factor_setup))
        .route("/v1/auth/2fa/confirm", post(routes::auth::two_factor_confirm))
        .route("/v1/auth/2fa/disable", post(routes::auth::two_factor_disable))
        .route("/v1/api-keys", post(routes::api_keys::create))
        .route("/v1/api-keys/{id}", delete(routes::api_keys::revoke))
        .route("/v1/admin/users/{id}/block", post(routes::admin::block))
        .route("/v1/admin/users/{id}/unblock", post(routes::admin::unblock))
        .route("/v1/admin/users/{id}/role", post(routes::admin::change_role))
        .route("/v1/admin/users/{id}/forget", post(routes::admin::forget))
        .route("/v1/admin/accounts/{id}/freeze", post(routes::admin::freeze))
        .route("/v1/admin/accounts/{id}/unfreeze", post(routes::admin::unfreeze))
        .route("/v1/holds", post(routes::holds::place))
        .route("/v1/holds/{id}/capture", post(routes::holds::capture))
        .route("/v1/holds/{id}/release", post(routes::holds::release))
        .route("/v1/orders", post(routes::orders::create))
        .route("/v1/orders/{id}/cancel", post(routes::orders::cancel))
        .route("/v1/orders/{id}/accept", post(routes::orders::accept))
        .route("/v1/orders/{id}/refunds", post(routes::orders::refund))
}

/// Routes that read the read models.
pub fn query_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts", get(routes::accounts::list))
        .route("/v1/accounts/{id}", get(routes::accounts::get))
        .route("/v1/accounts/{id}/transactions", get(routes::accounts::transactions))
        .route("/v1/accounts/{id}/statement", get(routes::accounts::statement))
        .route("/v1/transfers/{id}", get(routes::transfers::get))
        .route("/v1/commands/{key}", get(routes::commands::get))
        .route("/v1/auth/sessions", get(routes::auth::sessions))
        .route("/v1/api-keys", get(routes::api_keys::list))
        .route("/v1/admin/users", get(routes::admin::users))
        .route("/v1/admin/users/{id}", get(routes::admin::user))
        .route("/v1/me", get(routes::me::me))
        .route("/v1/me/activity", get(routes::me::activity))
        .route("/v1/holds/{id}", get(routes::holds::get))
        .route("/v1/accounts/{id}/holds", get(routes::holds::of_account))
        .route("/v1/orders", get(routes::orders::list))
        .route("/v1/orders/{id}", get(routes::orders::get))
        .route("/v1/live", get(live::live))
        .route("/v1/admin/audit/export", get(routes::audit::export))
}

/// The whole HTTP app for the selected roles, with health, docs and problem+json fallbacks.
pub fn app(state: AppState, command_api: bool, query_api: bool) -> Router {
    let mut router =
        Router::new().route("/healthz", get(routes::health::healthz)).route("/readyz", get(routes::health::readyz));
    if command_api {
        router = router.merge(command_routes());
    }
    if query_api {
        router = router.merge(query_routes());
    }
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not-found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "this route does not take that method")
        })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.request_timeout, time_limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Answers 503 `timeout` instead of hanging. A command cut off here rolls
/// back or has committed; its Idempotency-Key settles which.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than {} ms; retry (with the same Idempotency-Key for commands)",
                limit.as_millis()
            ),
        )
        .with_retry_after(1)
        .into_response(),
    }
}
