//! The HTTP surface: the command API (writes) and the query API (reads).
//! Handlers are thin: extract, call one application function, map the result.

pub mod auth;
pub mod extract;
mod openapi;
pub mod problem;
mod routes;
pub mod state;

pub use openapi::ApiDoc;
pub use state::AppState;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
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
}

/// Routes that read the read models.
pub fn query_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts", get(routes::accounts::list))
        .route("/v1/accounts/{id}", get(routes::accounts::get))
        .route("/v1/accounts/{id}/transactions", get(routes::accounts::transactions))
        .route("/v1/transfers/{id}", get(routes::transfers::get))
        .route("/v1/commands/{key}", get(routes::commands::get))
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
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
