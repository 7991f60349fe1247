//! Who is calling: access tokens (HS256 JWTs, 15 minutes, bound to a
//! session), API keys (`lk_...`), or the same access token in an HttpOnly
//! cookie with a double-submit CSRF check. Every request re-checks the
//! session or key, the role and the block in the database, so a revocation
//! or a block takes effect from the next request on.

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ledger_commands::identity::CredentialCheck;
use ledger_commands::ClientInfo;
use ledger_domain::events::{ApiScope, Role};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use subtle::ConstantTimeEq;
use uuid::Uuid;

pub const ACCESS_TOKEN_SECONDS: i64 = 15 * 60;
pub const ACCESS_COOKIE: &str = "ledger_access";
pub const REFRESH_COOKIE: &str = "ledger_refresh";
pub const CSRF_COOKIE: &str = "ledger_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const API_KEY_PREFIX: &str = "lk_";

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Derives each session's CSRF token, so a planted cookie/header pair
    /// does not pass: the token must be the one of the session presented.
    csrf_key: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    sid: Uuid,
    iat: i64,
    exp: i64,
    jti: Uuid,
    typ: String,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> JwtKeys {
        let mut csrf_key = b"ledger csrf v1\0".to_vec();
        csrf_key.extend_from_slice(secret);
        JwtKeys { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), csrf_key }
    }

    /// The CSRF token of a session: HMAC-SHA256(secret, session id), hex.
    pub fn csrf_token(&self, session_id: Uuid) -> String {
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.csrf_key) else {
            return String::new();
        };
        mac.update(session_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// An access token for a session and its lifetime in seconds.
    pub fn issue(&self, user_id: Uuid, session_id: Uuid) -> Result<(String, i64), Problem> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id,
            sid: session_id,
            iat: now,
            exp: now + ACCESS_TOKEN_SECONDS,
            jti: Uuid::new_v4(),
            typ: "access".into(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|_| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the token could not be issued")
        })?;
        Ok((token, ACCESS_TOKEN_SECONDS))
    }

    /// (user, session) of a valid token. Only HS256 with our key is accepted:
    /// `alg: none`, other algorithms, wrong keys and expired tokens are refused.
    fn verify(&self, token: &str) -> Option<(Uuid, Uuid)> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = decode::<Claims>(token, &self.decoding, &validation).ok()?;
        (data.claims.typ == "access").then_some((data.claims.sub, data.claims.sid))
    }
}

/// How the caller proved who they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Credential {
    /// An access token from a login; `cookie` when it came in `ledger_access`.
    Session {
        session_id: Uuid,
        cookie: bool,
    },
    ApiKey {
        key_id: Uuid,
        scopes: Vec<ApiScope>,
    },
}

/// The authenticated caller, with their current role.
#[derive(Clone, Debug)]
pub struct AuthUser {
    pub user_id: Uuid,
    pub role: Role,
    pub credential: Credential,
    pub client: ClientInfo,
}

impl AuthUser {
    pub fn session_id(&self) -> Option<Uuid> {
        match self.credential {
            Credential::Session { session_id, .. } => Some(session_id),
            Credential::ApiKey { .. } => None,
        }
    }
}

/// The client's address (the TCP peer) and user agent.
pub fn client_info(parts: &Parts) -> ClientInfo {
    let ip = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip().to_string());
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .filter(|ua| !ua.trim().is_empty())
        .map(|ua| ua.chars().take(300).collect());
    ClientInfo { ip, user_agent }
}

/// The client of an unauthenticated request (register, login, refresh).
pub struct Client(pub ClientInfo);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Client(client_info(parts)))
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

pub fn is_safe_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Double submit, bound to the session: the `X-CSRF-Token` header must equal
/// the `ledger_csrf` cookie, and both must be that session's token.
pub fn check_csrf(headers: &HeaderMap, expected: &str) -> Result<(), Problem> {
    let header = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    let cookie = cookie(headers, CSRF_COOKIE).unwrap_or("");
    let equal = |a: &str, b: &str| bool::from(a.as_bytes().ct_eq(b.as_bytes()));
    if header.is_empty() || expected.is_empty() || !equal(header, cookie) || !equal(header, expected) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "requests authenticated by cookie must send the ledger_csrf cookie's value in X-CSRF-Token",
        ));
    }
    Ok(())
}

fn blocked() -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "user-blocked", "this user is blocked")
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(authenticate(parts, state, SessionCheck::Now).await?.0)
    }
}

/// When an access token's session is checked against the database.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// Before the handler runs (every route but four).
    Now,
    /// By the command's own write transaction (`POST /v1/transfers` and a
    /// hold's placement, capture and release): the
    /// caller comes back with the least role (`user`) and the session to
    /// check, which the command refuses exactly as `Now` would.
    ByTheWrite,
}

/// The caller, and the session left unchecked (`SessionCheck::ByTheWrite`
/// with an access token only; API keys are always checked now).
pub async fn authenticate(
    parts: &Parts,
    state: &AppState,
    check: SessionCheck,
) -> Result<(AuthUser, Option<Uuid>), Problem> {
    let client = client_info(parts);
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| Problem::unauthorized("the Authorization header must be \"Bearer <token>\""))?;
        if token.starts_with(API_KEY_PREFIX) {
            return Ok((api_key_caller(state, token, &parts.method, client).await?, None));
        }
        return session_caller(state, token, false, client, check).await;
    }
    if let Some(token) = cookie(&parts.headers, ACCESS_COOKIE) {
        let token = token.to_owned();
        let (user, unchecked) = session_caller(state, &token, true, client, check).await?;
        if !is_safe_method(&parts.method) {
            let session_id = user.session_id().unwrap_or_default();
            check_csrf(&parts.headers, &state.jwt.csrf_token(session_id))?;
        }
        return Ok((user, unchecked));
    }
    Err(Problem::unauthorized("an Authorization: Bearer <access_token> header (or a session cookie) is required"))
}

async fn session_caller(
    state: &AppState,
    token: &str,
    cookie: bool,
    client: ClientInfo,
    check: SessionCheck,
) -> Result<(AuthUser, Option<Uuid>), Problem> {
    let (user_id, session_id) =
        state.jwt.verify(token).ok_or_else(|| Problem::unauthorized("the access token is invalid or expired"))?;
    if check == SessionCheck::ByTheWrite {
        let caller =
            AuthUser { user_id, role: Role::User, credential: Credential::Session { session_id, cookie }, client };
        return Ok((caller, Some(session_id)));
    }
    let caller = match state.ledger.check_session(user_id, session_id).await? {
        CredentialCheck::Ended => Err(Problem::unauthorized("the session has ended; log in again")),
        CredentialCheck::Valid(p) if p.blocked => Err(blocked()),
        CredentialCheck::Valid(p) => {
            Ok(AuthUser { user_id, role: p.role, credential: Credential::Session { session_id, cookie }, client })
        }
    }?;
    Ok((caller, None))
}

async fn api_key_caller(state: &AppState, key: &str, method: &Method, client: ClientInfo) -> Result<AuthUser, Problem> {
    let found = state
        .ledger
        .check_api_key(key)
        .await?
        .ok_or_else(|| Problem::unauthorized("the API key is invalid or revoked"))?;
    if found.principal.blocked {
        return Err(blocked());
    }
    let needed = if is_safe_method(method) { ApiScope::Read } else { ApiScope::Write };
    if !found.scopes.contains(&needed) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            format!("this API key lacks the \"{}\" scope", ledger_commands::identity::scope_name(needed)),
        ));
    }
    Ok(AuthUser {
        user_id: found.principal.user_id,
        role: found.principal.role,
        credential: Credential::ApiKey { key_id: found.key_id, scopes: found.scopes },
        client,
    })
}

/// `Set-Cookie` values for a browser session.
pub fn session_cookies(
    access_token: &str,
    refresh_token: &str,
    refresh_max_age: i64,
    csrf_token: &str,
    secure: bool,
) -> Vec<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    [
        format!("{ACCESS_COOKIE}={access_token}; Path=/; Max-Age={ACCESS_TOKEN_SECONDS}; HttpOnly; SameSite=Strict{secure}"),
        format!("{REFRESH_COOKIE}={refresh_token}; Path=/v1/auth; Max-Age={refresh_max_age}; HttpOnly; SameSite=Strict{secure}"),
        // Readable by the page's script, which echoes it in X-CSRF-Token.
        format!("{CSRF_COOKIE}={csrf_token}; Path=/; Max-Age={refresh_max_age}; SameSite=Strict{secure}"),
    ]
    .into_iter()
    .filter_map(|c| HeaderValue::from_str(&c).ok())
    .collect()
}

/// `Set-Cookie` values that delete the session cookies.
pub fn cleared_cookies(secure: bool) -> Vec<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    [
        format!("{ACCESS_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
        format!("{REFRESH_COOKIE}=; Path=/v1/auth; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
        format!("{CSRF_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict{secure}"),
    ]
    .into_iter()
    .filter_map(|c| HeaderValue::from_str(&c).ok())
    .collect()
}
