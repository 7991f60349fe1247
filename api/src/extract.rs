//! Request extractors that answer bad input with problem+json.

use crate::auth::{authenticate, AuthUser, Credential, SessionCheck};
use crate::problem::Problem;
use crate::rate_limit::Caller;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use ledger_commands::idempotency;
use ledger_commands::{CommandEnvelope, CommandError};
use ledger_projections::read_side::{self, WaitError};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// `POST /v1/transfers/batch` only: 1000 transfers of about 250 bytes each.
pub const MAX_BATCH_BODY_BYTES: usize = 512 * 1024;

/// Reads a JSON body: 413 past the limit, 415 for another media type, 400
/// for broken JSON, 422 naming the field for wrong shapes or types.
async fn json_body(headers: &HeaderMap, bytes: Result<Bytes, Problem>) -> Result<Value, Problem> {
    let bytes = bytes?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        Problem::new(StatusCode::BAD_REQUEST, "malformed-json", format!("the body is not valid JSON: {e}"))
    })
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Problem> {
    if !value.is_object() {
        return Err(Problem::validation("body", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        Problem::validation(&field, strip_position(&e.inner().to_string()))
    })
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

async fn body_bytes(req: Request, state: &AppState) -> Result<Bytes, Problem> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "the body is larger than this route accepts (64 KiB; 512 KiB for transfer batches)",
            )
        } else {
            Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "the body could not be read")
        }
    })
}

/// A JSON body for routes without idempotency (register, login).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let value = json_body(&headers, body_bytes(req, state).await).await?;
        Ok(JsonBody(typed(value)?))
    }
}

/// Everything a command route needs: the caller, the Idempotency-Key, the
/// request's fingerprint and the typed body.
pub struct CommandRequest<T> {
    pub user: AuthUser,
    pub idempotency_key: String,
    pub request_hash: Vec<u8>,
    pub correlation_id: Option<Uuid>,
    pub body: T,
}

impl<T: DeserializeOwned> FromRequest<AppState> for CommandRequest<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(command_request(req, state, SessionCheck::Now).await?.0)
    }
}

/// A command whose access token's session is checked by its own write
/// transaction instead of a statement of its own before it (`POST
/// /v1/transfers`: group commit reads the group's sessions with its
/// records, a hold's placement, capture and release too; alone, a hold
/// command in the read after its locks, `payments::decide_hold`). It carries no `AuthUser`: the caller's
/// role is unknown until the write, so nothing can be authorized on it
/// before; the envelope goes straight to `Ledger::execute`, which refuses an
/// ended session (401) or a blocked user (403) before it looks at the key
/// (after taking the command's locks), and records nothing.
pub struct WriteChecksSession<T> {
    pub envelope: CommandEnvelope,
    pub body: T,
}

impl<T: DeserializeOwned> FromRequest<AppState> for WriteChecksSession<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (request, unchecked_session) = command_request(req, state, SessionCheck::ByTheWrite).await?;
        let envelope = CommandEnvelope {
            actor: request.user.user_id,
            idempotency_key: request.idempotency_key,
            request_hash: request.request_hash,
            correlation_id: request.correlation_id,
            client: request.user.client,
            causation_id: None,
            unchecked_session,
        };
        Ok(WriteChecksSession { envelope, body: request.body })
    }
}

/// The request and the session left for the write to check (`ByTheWrite`).
async fn command_request<T: DeserializeOwned>(
    req: Request,
    state: &AppState,
    check: SessionCheck,
) -> Result<(CommandRequest<T>, Option<Uuid>), Problem> {
    let (parts, body) = req.into_parts();
    let (user, unchecked_session) = authenticate(&parts, state, check).await?;
    // A session a write here already found ended is refused at the door, so
    // a revoked token cannot spend its user's rate limit (it is refused by
    // the first write it reaches, at the cost of one token).
    if unchecked_session.is_some_and(|session| state.ledger.session_known_ended(session)) {
        return Err(CommandError::SessionEnded.into());
    }
    rate_limit(state, &user)?;
    let key = match parts.headers.get(IDEMPOTENCY_KEY) {
        None => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-required",
                "every POST needs an Idempotency-Key header, unique per intended operation",
            ))
        }
        Some(v) => v.to_str().ok().filter(|k| idempotency::key_is_valid(k)).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-invalid",
                format!("the Idempotency-Key must be 1 to {} printable ASCII characters", idempotency::MAX_KEY_LEN),
            )
        })?,
    }
    .to_owned();
    let correlation_id =
        parts.headers.get("x-correlation-id").and_then(|v| v.to_str().ok()).and_then(|v| Uuid::parse_str(v).ok());
    let method = parts.method.to_string();
    let path = parts.uri.path().to_owned();
    let headers = parts.headers.clone();
    let value = json_body(&headers, body_bytes(Request::from_parts(parts, body), state).await).await?;
    let request_hash = idempotency::request_hash(&method, &path, &canonical_json(&value));
    let request = CommandRequest { user, idempotency_key: key, request_hash, correlation_id, body: typed(value)? };
    Ok((request, unchecked_session))
}

/// The per-user (or per-API-key) limit on command requests.
pub fn rate_limit(state: &AppState, user: &AuthUser) -> Result<(), Problem> {
    let caller = match user.credential {
        Credential::ApiKey { key_id, .. } => Caller::ApiKey(key_id),
        Credential::Session { .. } => Caller::User(user.user_id),
    };
    state.rate_limit.check(caller).map_err(|retry_after| {
        Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "too many requests; slow down")
            .with_retry_after(retry_after)
    })
}

/// The same limit for unauthenticated routes, per client address.
pub fn rate_limit_client(state: &AppState, client: &ledger_commands::ClientInfo) -> Result<(), Problem> {
    let Some(ip) = client.ip.as_deref().and_then(|ip| ip.parse().ok()) else { return Ok(()) };
    state.rate_limit.check(Caller::Address(ip)).map_err(|retry_after| {
        Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "too many requests; slow down")
            .with_retry_after(retry_after)
    })
}

/// JSON with object keys sorted at every level (see `ledger_domain::canonical`).
pub use ledger_domain::canonical::to_string as canonical_json;

/// Query parameters; a bad one is a 422 naming it.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for QueryParams<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(QueryParams).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "query".to_owned() } else { path };
            Problem::validation(&field, e.inner())
        })
    }
}

/// One path segment as text. A segment that is not valid UTF-8 names
/// nothing that exists: 404 problem+json rather than axum's plain-text 400.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(segment)) => Ok(PathParam(segment)),
            Err(_) => Err(Problem::new(StatusCode::NOT_FOUND, "not-found", "the path names nothing that exists")),
        }
    }
}

/// `min_position` from a query string; given twice or malformed is a 422,
/// never a silent "no wait".
fn min_position(query: &str) -> Result<Option<i64>, Problem> {
    let mut found = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "min_position" {
            continue;
        }
        if found.is_some() {
            return Err(Problem::validation("min_position", "must be given at most once"));
        }
        let position: i64 = value
            .parse()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| Problem::validation("min_position", "must be a non-negative integer"))?;
        found = Some(position);
    }
    Ok(found)
}

/// Read-your-writes: with `?min_position=N`, waits (about 5 s at most) until
/// the read side has applied position N; 504 `projection-lag` past that.
pub struct ReadAfter;

impl FromRequestParts<AppState> for ReadAfter {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(position) = min_position(parts.uri.query().unwrap_or(""))? else {
            return Ok(ReadAfter);
        };
        if position == 0 {
            return Ok(ReadAfter);
        }
        match read_side::wait_for_applied(&state.pool, position, state.read_wait, state.applied.as_ref()).await {
            Ok(()) => Ok(ReadAfter),
            Err(WaitError::Lag(p)) => Err(Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "projection-lag",
                format!("the read side has not applied position {p} yet; retry shortly"),
            )),
            Err(e) => {
                tracing::error!(error = %e, "waiting for the read side failed");
                Err(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service-unavailable",
                    "the ledger cannot reach its database; retry later",
                ))
            }
        }
    }
}
