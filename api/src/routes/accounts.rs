use super::{account_not_found, money, outcome_response, path_id};
use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::extract::{CommandRequest, PathParam, QueryParams, ReadAfter};
use crate::problem::{render_rejection, Problem};
use crate::state::AppState;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use ledger_commands::{CommandEnvelope, LedgerCommand};
use ledger_projections::time_travel::{self, AsOf};
use ledger_projections::{balances, statements};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// ISO 4217 code, e.g. "USD".
    pub currency: String,
    pub name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct OpenAccountResponse {
    pub account_id: Uuid,
    pub currency: String,
    pub name: Option<String>,
    pub position: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyRequest {
    /// Decimal string with at most the currency's minor-unit digits, e.g. "12.30".
    pub amount: String,
    pub reference: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MovementResponse {
    pub transfer_id: Uuid,
    pub position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct AccountResponse {
    pub account_id: Uuid,
    pub currency: String,
    pub name: Option<String>,
    pub balance: String,
    pub available: String,
    pub version: i64,
    pub position: i64,
    /// A frozen account refuses debits and credits.
    pub frozen: bool,
    /// With `as_of` or `as_of_position`: the point the balance is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub as_of: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct AccountList {
    pub items: Vec<AccountResponse>,
}

impl From<balances::AccountView> for AccountResponse {
    fn from(a: balances::AccountView) -> Self {
        AccountResponse {
            balance: money(a.balance, &a.currency),
            available: money(a.available, &a.currency),
            account_id: a.account_id,
            name: a.name,
            version: a.version,
            position: a.last_position,
            frozen: a.frozen,
            as_of: None,
            currency: a.currency,
        }
    }
}

fn envelope<T>(request: &CommandRequest<T>) -> CommandEnvelope {
    CommandEnvelope {
        actor: request.user.user_id,
        idempotency_key: request.idempotency_key.clone(),
        request_hash: request.request_hash.clone(),
        correlation_id: request.correlation_id,
        client: request.user.client.clone(),
        causation_id: None,
        unchecked_session: None,
    }
}

pub(crate) async fn run(
    state: &AppState,
    envelope: CommandEnvelope,
    command: LedgerCommand,
) -> Result<Response, Problem> {
    Ok(outcome_response(state.ledger.execute(&envelope, command, render_rejection).await?))
}

#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = OpenAccountRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, body = OpenAccountResponse), (status = 422, description = "validation")))]
pub async fn open(
    State(state): State<AppState>,
    request: CommandRequest<OpenAccountRequest>,
) -> Result<Response, Problem> {
    let envelope = envelope(&request);
    let OpenAccountRequest { currency, name } = request.body;
    run(&state, envelope, LedgerCommand::OpenAccount { currency, name }).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/deposits", tag = "accounts", request_body = MoneyRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, body = MovementResponse), (status = 404, description = "account-not-found"), (status = 422, description = "validation")))]
pub async fn deposit(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<MoneyRequest>,
) -> Result<Response, Problem> {
    let account_id = path_id(&id, account_not_found)?;
    let envelope = envelope(&request);
    let MoneyRequest { amount, reference } = request.body;
    run(&state, envelope, LedgerCommand::Deposit { account_id, amount, reference }).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/withdrawals", tag = "accounts", request_body = MoneyRequest,
    params(("id" = Uuid, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 201, body = MovementResponse), (status = 404, description = "account-not-found"), (status = 422, description = "insufficient-funds or validation")))]
pub async fn withdraw(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    request: CommandRequest<MoneyRequest>,
) -> Result<Response, Problem> {
    let account_id = path_id(&id, account_not_found)?;
    let envelope = envelope(&request);
    let MoneyRequest { amount, reference } = request.body;
    run(&state, envelope, LedgerCommand::Withdraw { account_id, amount, reference }).await
}

pub(crate) fn command_envelope<T>(request: &CommandRequest<T>) -> CommandEnvelope {
    envelope(request)
}

#[derive(Deserialize, IntoParams)]
pub struct AccountListQuery {
    /// Support and admin only: another user's accounts.
    pub user_id: Option<Uuid>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[utoipa::path(get, path = "/v1/accounts", tag = "accounts",
    params(AccountListQuery),
    responses((status = 200, body = AccountList), (status = 403, description = "forbidden (user_id of another user without a staff role)")))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(query): QueryParams<AccountListQuery>,
    _: ReadAfter,
) -> Result<Json<AccountList>, Problem> {
    let owner = query.user_id.unwrap_or(user.user_id);
    if owner != user.user_id {
        authorize(&user, Action::StaffRead)?;
    }
    let items = balances::accounts_of(&state.pool, owner).await?;
    Ok(Json(AccountList { items: items.into_iter().map(AccountResponse::from).collect() }))
}

/// The account if the access policy lets the caller read it.
async fn readable_account(state: &AppState, user: &AuthUser, id: &str) -> Result<balances::AccountView, Problem> {
    let account_id = path_id(id, account_not_found)?;
    let account = balances::account(&state.pool, account_id).await?.ok_or_else(account_not_found)?;
    authorize(user, Action::Read { owners: &[account.owner_id], hidden: account_not_found })?;
    Ok(account)
}

#[derive(Deserialize, IntoParams)]
pub struct AccountQuery {
    /// Time travel: the balance at this RFC 3339 time.
    pub as_of: Option<String>,
    /// Time travel: the balance right after this log position.
    pub as_of_position: Option<i64>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "accounts",
    params(("id" = Uuid, Path), AccountQuery),
    responses((status = 200, body = AccountResponse), (status = 404, description = "account-not-found"), (status = 504, description = "projection-lag")))]
pub async fn get(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<AccountQuery>,
    _: ReadAfter,
) -> Result<Json<AccountResponse>, Problem> {
    let account = readable_account(&state, &user, &id).await?;
    let as_of = match (query.as_of.as_deref(), query.as_of_position) {
        (None, None) => return Ok(Json(account.into())),
        (Some(_), Some(_)) => return Err(Problem::validation("as_of", "give as_of or as_of_position, not both")),
        (Some(t), None) => AsOf::Time(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| Problem::validation("as_of", "must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z"))?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(p)) => {
            let mut conn = state.pool.acquire().await?;
            let point = ledger_commands::store::point_of(&mut conn, p)
                .await
                .map_err(|_| Problem::validation("as_of_position", "could not be read"))?
                .ok_or_else(|| Problem::validation("as_of_position", "is not a position in the log"))?;
            AsOf::Point(point)
        }
    };
    let (balance, available) = time_travel::balance_as_of(&state.pool, account.account_id, as_of).await?;
    let mut response: AccountResponse = account.into();
    response.balance = money(balance, &response.currency);
    response.available = money(available, &response.currency);
    if let AsOf::Point(p) = as_of {
        response.position = p.position;
    }
    response.as_of = Some(match as_of {
        AsOf::Point(p) => serde_json::json!({ "position": p.position }),
        AsOf::Time(t) => serde_json::json!({ "time": t }),
    });
    Ok(Json(response))
}

#[derive(Deserialize, IntoParams)]
pub struct StatementQuery {
    /// RFC 3339, inclusive; the start of the log when absent.
    pub from: Option<String>,
    /// RFC 3339, exclusive; now when absent.
    pub to: Option<String>,
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StatementResponse {
    pub account_id: Uuid,
    pub currency: String,
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    pub opening_balance: String,
    /// Oldest first.
    pub entries: Vec<TransactionItem>,
    pub closing_balance: String,
}

#[utoipa::path(get, path = "/v1/accounts/{id}/statement", tag = "accounts", params(("id" = Uuid, Path), StatementQuery),
    responses((status = 200, body = StatementResponse), (status = 404, description = "account-not-found")))]
pub async fn statement(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<StatementQuery>,
    _: ReadAfter,
) -> Result<Json<StatementResponse>, Problem> {
    let time = |field: &str, value: Option<&str>| -> Result<Option<chrono::DateTime<chrono::Utc>>, Problem> {
        value
            .filter(|v| !v.is_empty())
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .map_err(|_| Problem::validation(field, "must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z"))
            })
            .transpose()
    };
    let from = time("from", query.from.as_deref())?;
    let to = time("to", query.to.as_deref())?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(Problem::validation("from", "must not be after to"));
        }
    }
    let account = readable_account(&state, &user, &id).await?;
    let s = time_travel::statement(&state.pool, account.account_id, from, to).await?.ok_or_else(|| {
        Problem::validation(
            "from",
            format!("the period holds more than {} entries; ask for a shorter one", time_travel::MAX_STATEMENT_ENTRIES),
        )
    })?;
    let currency = account.currency;
    Ok(Json(StatementResponse {
        account_id: account.account_id,
        from,
        to,
        opening_balance: money(s.opening_balance, &currency),
        closing_balance: money(s.closing_balance, &currency),
        entries: s.entries.into_iter().map(|e| item(e, &currency)).collect(),
        currency,
    }))
}

fn item(e: statements::EntryView, currency: &str) -> TransactionItem {
    TransactionItem {
        transfer_id: e.transfer_id,
        direction: e.direction,
        amount: money(e.amount, currency),
        balance_after: money(e.balance_after, currency),
        counterparty_account: e.counterparty_account,
        kind: e.kind,
        reference: e.reference,
        recorded_at: e.recorded_at,
        position: e.position,
    }
}

#[derive(Deserialize, IntoParams)]
pub struct TransactionsQuery {
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
    /// Read-your-writes; consumed by the `ReadAfter` extractor, listed here for the docs.
    #[allow(dead_code)]
    pub min_position: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TransactionItem {
    pub transfer_id: Uuid,
    /// "debit" or "credit".
    pub direction: String,
    pub amount: String,
    pub balance_after: String,
    pub counterparty_account: Uuid,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct TransactionPage {
    pub items: Vec<TransactionItem>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", tag = "accounts",
    params(("id" = Uuid, Path), TransactionsQuery),
    responses((status = 200, body = TransactionPage), (status = 404, description = "account-not-found")))]
pub async fn transactions(
    State(state): State<AppState>,
    user: AuthUser,
    PathParam(id): PathParam,
    QueryParams(query): QueryParams<TransactionsQuery>,
    _: ReadAfter,
) -> Result<Json<TransactionPage>, Problem> {
    let limit = super::page_limit(query.limit)?;
    let before = super::position_cursor(query.cursor.as_deref())?;
    let account = readable_account(&state, &user, &id).await?;
    let entries = statements::entries(&state.pool, account.account_id, limit, before).await?;
    let next_cursor = (entries.len() as i64 == limit).then(|| entries.last().map(|e| e.entry_no.to_string())).flatten();
    let currency = account.currency;
    Ok(Json(TransactionPage {
        items: entries
            .into_iter()
            .map(|e| TransactionItem {
                transfer_id: e.transfer_id,
                direction: e.direction,
                amount: money(e.amount, &currency),
                balance_after: money(e.balance_after, &currency),
                counterparty_account: e.counterparty_account,
                kind: e.kind,
                reference: e.reference,
                recorded_at: e.recorded_at,
                position: e.position,
            })
            .collect(),
        next_cursor,
    }))
}
