use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "PostgreSQL and NATS reachable; lags reported"), (status = 503, description = "a dependency is down")))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool).await.is_ok();
    let nats = state.nats.as_ref().map(|c| c.connection_state() == async_nats::connection::State::Connected);
    let mut projections = serde_json::Map::new();
    if postgres {
        if let Ok(lags) = ledger_projections::read_side::lags(&state.pool).await {
            for (name, lag) in lags {
                projections.insert(name.into(), json!({ "lag_events": lag }));
            }
        }
    }
    let relay_lag =
        if postgres { ledger_commands::relay::relay_lag(&state.pool, &state.names).await.ok() } else { None };
    let ready = postgres && nats != Some(false);
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "postgres": if postgres { "ok" } else { "unreachable" },
        "nats": match nats { Some(true) => "ok", Some(false) => "unreachable", None => "not used" },
        "relay": { "lag_events": relay_lag },
        "projections": projections,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}
