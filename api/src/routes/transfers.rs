use super::accounts::{command_envelope, run, MovementResponse};
use super::{money, path_id, transfer_not_found};
use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{CommandRequest, PathParam, ReadAfter, WriteChecksSession};
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use ledger_commands::LedgerCommand;
use ledger_projections::statements;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from_account: Uuid,
    pub to_account: Uuid,
    /// Decimal string, e.g. "12.30".
    pub amount: String,
    pub reference: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TransferResponse {
    pub transfer_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: String,
    pub currency: String,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub position: i64,
}

#[utoipa::path(post, path = "/v1/transfers", tag = "transfers", request_body = TransferRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, body = MovementResponse),
        (status = 401, description = "unauthorized (also a session that has ended, checked by the transfer's own write)"),
        (status = 403, description = "user-blocked or csrf"),
        (status = 404, description = "account-not-found"),
        (status = 422, description = "insufficient-funds, currency-mismatch, same-account or validation")))]
pub async fn create(
    State(state): State<AppState>,
    request: WriteChecksSession<TransferRequest>,
) -> Result<Response, Problem> {
    let WriteChecksSession { envelope, body: TransferRequest { from_account, to_account, amount, reference } } =
        request;
    run(&state, envelope, LedgerCommand::Transfer { from_account, to_account, amount, reference }).await
}

#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "transfers",
    params(("id" = Uuid, Path), ("min_position" = Option<i64>, Query)),
    responses((status = 200, body = TransferResponse), (status = 404, description = "transfer-not-found")))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    _: ReadAfter,
) -> Result<Json<TransferResponse>, Problem> {
    let transfer_id = path_id(&id, transfer_not_found)?;
    let t = statements::transfer(&state.pool, transfer_id).await?.ok_or_else(transfer_not_found)?;
    authorize(&user, Action::Read { owners: &[t.from_owner, t.to_owner], hidden: transfer_not_found })?;
    Ok(Json(TransferResponse {
        amount: money(t.amount, &t.currency),
        transfer_id: t.transfer_id,
        from_account: t.from_account,
        to_account: t.to_account,
        currency: t.currency,
        kind: t.kind,
        reference: t.reference,
        recorded_at: t.recorded_at,
        position: t.position,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItemRequest {
    /// The item's own Idempotency-Key: the same as a single transfer's.
    pub key: String,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: String,
    pub reference: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1000 transfers.
    pub transfers: Vec<BatchItemRequest>,
    /// All or none (true), or each on its own with a result per item (false).
    pub atomic: bool,
}

#[utoipa::path(post, path = "/v1/transfers/batch", tag = "transfers", request_body = BatchRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, description = "atomic: every item done; {atomic, results, position}"),
        (status = 200, description = "not atomic: a result per item; {atomic, results, position}"),
        (status = 422, description = "atomic: the first refused item, with `item`; or validation")))]
pub async fn batch(State(state): State<AppState>, request: CommandRequest<BatchRequest>) -> Result<Response, Problem> {
    let count = request.body.transfers.len();
    if count == 0 || count > ledger_commands::batch::MAX_ITEMS {
        return Err(Problem::validation(
            "transfers",
            format!("must hold 1 to {} transfers", ledger_commands::batch::MAX_ITEMS),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, item) in request.body.transfers.iter().enumerate() {
        if !ledger_commands::idempotency::key_is_valid(&item.key) {
            return Err(Problem::validation(
                &format!("transfers[{i}].key"),
                "must be 1 to 255 printable ASCII characters",
            ));
        }
        if !seen.insert(item.key.as_str()) {
            return Err(Problem::validation(&format!("transfers[{i}].key"), "is used twice in this batch"));
        }
    }
    let envelope = command_envelope(&request);
    // A non-atomic batch holds its own key while its items run under theirs:
    // an item under the same key would wait for the batch that waits for it.
    if let Some(i) = request.body.transfers.iter().position(|t| t.key == envelope.idempotency_key) {
        return Err(Problem::validation(
            &format!("transfers[{i}].key"),
            "must differ from the request's Idempotency-Key, which records the whole batch",
        ));
    }
    let atomic = request.body.atomic;
    let items: Vec<ledger_commands::batch::BatchItem> = request
        .body
        .transfers
        .into_iter()
        .map(|t| ledger_commands::batch::BatchItem {
            key: t.key,
            from_account: t.from_account,
            to_account: t.to_account,
            amount: t.amount,
            reference: t.reference,
        })
        .collect();
    if atomic {
        run(&state, envelope, LedgerCommand::TransferBatch { items }).await
    } else {
        let outcome = state.ledger.execute_each(&envelope, items, crate::problem::render_rejection).await?;
        Ok(super::outcome_response(outcome))
    }
}
