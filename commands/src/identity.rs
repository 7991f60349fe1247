//! Identity: registration, login with throttling and two-factor codes,
//! sessions with rotating refresh tokens, password changes, API keys, and the
//! per-request check of who a caller is.
//!
//! Every change here appends its event (with the client's IP and user agent
//! in the metadata) in the same transaction as the table rows it touches.
//! Secrets never enter an event: passwords are argon2id hashes in
//! `credentials`, tokens and codes are SHA-256 hashes, TOTP secrets are sealed.

use crate::ledger::{user_change, ClientInfo, CommandError, Ledger};
use crate::secrets::{random_bytes, random_token, token_hash};
use crate::store::{self, is_unique_violation, user_stream, EventMetadata, StreamAppend};
use crate::{passwords, totp};
use chrono::{DateTime, Duration as Span, Utc};
use ledger_domain::events::{
    ApiKeyCreated, ApiKeyRevoked, ApiScope, LoggedOut, LoginFailed, LoginFailure, RefreshTokenReused, Role,
    SecondFactor, SessionRevoked, UserLoggedIn,
};
use ledger_domain::user::{self, UserCommand, UserState};
use ledger_domain::{DomainError, Event};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// Limits for logins and sessions, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct IdentityPolicy {
    /// Failed logins per email and per IP before the backoff starts.
    pub failures_before_backoff: u32,
    pub refresh_token_lifetime: std::time::Duration,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        IdentityPolicy {
            failures_before_backoff: 5,
            refresh_token_lifetime: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// The longest backoff after repeated failures.
const MAX_BACKOFF_SECONDS: i64 = 15 * 60;
/// Failures older than this no longer count.
const FAILURE_MEMORY_SECONDS: i64 = 60 * 60;
const RECOVERY_CODES: usize = 10;
const REFRESH_TOKEN_BYTES: usize = 32;
const API_KEY_PREFIX: &str = "lk_";
const TOTP_ISSUER: &str = "Ledger";

/// A new session: who, which session, and its first refresh token.
#[derive(Debug)]
pub struct SessionGrant {
    pub user_id: Uuid,
    pub session_id: Uuid,
    /// Shown to the client once; only its hash is stored.
    pub refresh_token: String,
    pub refresh_expires_in: i64,
}

/// Who a valid credential belongs to, checked on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: Role,
    pub blocked: bool,
}

/// Why a credential was not accepted on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialCheck {
    Valid(Principal),
    /// The session was revoked or has expired, or the key was revoked.
    Ended,
}

impl CredentialCheck {
    /// Why a command under this session is refused, if it is: what the
    /// API's extractor answers for an ended session or a blocked user.
    pub(crate) fn refusal(self) -> Option<crate::ledger::CommandError> {
        match self {
            CredentialCheck::Ended => Some(crate::ledger::CommandError::SessionEnded),
            CredentialCheck::Valid(p) if p.blocked => Some(crate::ledger::CommandError::UserBlocked),
            CredentialCheck::Valid(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionView {
    pub session_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub user_agent: Option<String>,
    pub client_ip: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiKeyView {
    pub key_id: Uuid,
    pub name: String,
    pub scopes: Vec<ApiScope>,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A freshly created API key: the secret is returned once.
#[derive(Debug)]
pub struct NewApiKey {
    pub view: ApiKeyView,
    pub key: String,
}

/// A valid API key's owner and scopes.
#[derive(Clone, Debug)]
pub struct ApiKeyPrincipal {
    pub key_id: Uuid,
    pub scopes: Vec<ApiScope>,
    pub principal: Principal,
}

#[derive(Debug, Clone)]
pub struct TwoFactorSetup {
    pub secret_base32: String,
    pub otpauth_uri: String,
}

#[derive(Debug, Clone)]
pub struct UserSummary {
    pub user_id: Uuid,
    pub email: String,
    pub role: Role,
    pub blocked: bool,
    pub created_at: DateTime<Utc>,
    pub two_factor: bool,
}

fn metadata(actor: Option<Uuid>, client: &ClientInfo) -> EventMetadata {
    let command_id = Uuid::now_v7();
    EventMetadata {
        command_id: Some(command_id),
        correlation_id: Some(command_id),
        causation_id: None,
        // Failed logins for unknown emails have no user: the nil id stands for "anonymous".
        actor_id: Some(actor.unwrap_or(Uuid::nil())),
        recorded_at: Utc::now(),
        client_ip: client.ip.clone(),
        user_agent: client.user_agent.clone(),
    }
}

/// Appends one security event in a stream of its own: these record
/// occurrences, not state another command decides against.
async fn record_security_event(
    conn: &mut PgConnection,
    authenticator: &store::EventMac,
    event: Event,
    actor: Option<Uuid>,
    client: &ClientInfo,
) -> Result<i64, CommandError> {
    let append =
        StreamAppend { stream_id: format!("security-{}", Uuid::now_v7()), expected_version: 0, events: vec![event] };
    Ok(store::append(conn, &[append], &metadata(actor, client), authenticator).await?.unwrap_or_default())
}

/// Appends a decided change to a user's stream.
async fn record_user_change(
    conn: &mut PgConnection,
    authenticator: &store::EventMac,
    user_id: Uuid,
    command: UserCommand,
    actor: Uuid,
    client: &ClientInfo,
) -> Result<(i64, UserState), CommandError> {
    let (appends, state) = user_change(conn, user_id, command).await?.map_err(CommandError::Rejected)?;
    let position =
        store::append(conn, &appends, &metadata(Some(actor), client), authenticator).await?.unwrap_or_default();
    Ok((position, state))
}

/// Ends sessions of a user (all, or all but `keep`) and their refresh tokens.
pub(crate) async fn revoke_sessions(
    conn: &mut PgConnection,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = $3
         WHERE user_id = $1 AND revoked_at IS NULL AND session_id IS DISTINCT FROM $2
         RETURNING session_id",
    )
    .bind(user_id)
    .bind(keep)
    .bind(reason)
    .fetch_all(&mut *conn)
    .await
}

async fn revoke_session(
    conn: &mut PgConnection,
    user_id: Uuid,
    session_id: Uuid,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let revoked = sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = $3
         WHERE session_id = $1 AND user_id = $2 AND revoked_at IS NULL",
    )
    .bind(session_id)
    .bind(user_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(revoked.rows_affected() == 1)
}

/// The throttle subjects of a login attempt.
fn throttle_subjects(email: &str, client: &ClientInfo) -> Vec<String> {
    let mut subjects = vec![format!("email:{email}")];
    if let Some(ip) = &client.ip {
        subjects.push(format!("ip:{ip}"));
    }
    subjects
}

/// Seconds to wait after `failures` consecutive failures: none up to the
/// threshold, then 2, 4, 8 ... seconds, at most 15 minutes.
pub fn backoff_seconds(failures: u32, threshold: u32) -> i64 {
    if failures < threshold {
        return 0;
    }
    let exponent = (failures - threshold + 1).min(20);
    (1i64 << exponent).min(MAX_BACKOFF_SECONDS)
}

/// 100 random bits as four groups of five base32 characters.
fn recovery_code() -> String {
    let raw = random_token(13);
    format!("{}-{}-{}-{}", &raw[..5], &raw[5..10], &raw[10..15], &raw[15..20])
}

fn normalize_recovery_code(code: &str) -> String {
    code.trim().to_ascii_lowercase()
}

impl Ledger {
    /// Registers a user: the event and the credentials in one transaction.
    pub async fn register(
        &self,
        email: String,
        password: String,
        display_name: Option<String>,
        client: &ClientInfo,
    ) -> Result<(Uuid, i64), CommandError> {
        user::check_password(&password)?;
        let user_id = Uuid::now_v7();
        let events = user::decide(&UserState::default(), UserCommand::Register { user_id, email, display_name })?;
        let email = match events.first() {
            Some(Event::UserRegistered(registered)) => registered.email.clone(),
            _ => return Err(CommandError::Rejected(DomainError::validation("email", "could not be registered"))),
        };
        let hash = self.hash_password(password).await?;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query("INSERT INTO credentials (user_id, email, password_hash) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(&email)
            .bind(&hash)
            .execute(&mut *tx)
            .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(CommandError::EmailTaken),
            other => {
                other?;
            }
        }
        let mut sealed = Vec::with_capacity(events.len());
        for event in events {
            sealed.push(seal_event(&mut tx, &self.secrets, user_id, event).await?);
        }
        let appends = [StreamAppend { stream_id: user_stream(user_id), expected_version: 0, events: sealed }];
        let position = store::append(&mut tx, &appends, &metadata(Some(user_id), client), &self.event_mac)
            .await?
            .unwrap_or_default();
        tx.commit().await?;
        self.appended.notify_one();
        Ok((user_id, position))
    }

    /// Gives a user a role outside any admin session: the CLI's way to create
    /// the first admin. Recorded as an event by the nil (system) actor.
    pub async fn assign_role(&self, user_id: Uuid, role: Role, reason: &str) -> Result<i64, CommandError> {
        let mut tx = self.pool.begin().await?;
        let (position, _) = record_user_change(
            &mut tx,
            &self.event_mac,
            user_id,
            UserCommand::ChangeRole { user_id, role, reason: Some(reason.to_owned()) },
            Uuid::nil(),
            &ClientInfo::default(),
        )
        .await?;
        sqlx::query("UPDATE credentials SET role = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(position)
    }

    /// Checks the password (and the second factor when it is on), then opens a
    /// session. Unknown emails cost the same as wrong passwords.
    pub async fn login(
        &self,
        raw_email: &str,
        password: String,
        second_factor: Option<String>,
        client: &ClientInfo,
    ) -> Result<SessionGrant, CommandError> {
        let email = user::normalize_email(raw_email)
            .unwrap_or_else(|_| raw_email.trim().to_lowercase().chars().take(254).collect());
        let subjects = throttle_subjects(&email, client);
        self.reserve_attempt(&subjects).await?;
        let outcome = self.login_checked(&email, password, second_factor, &subjects, client).await;
        if let Err(CommandError::Store(_) | CommandError::Hashing | CommandError::Secret(_)) = &outcome {
            // A fault is not a guess: give the attempt back.
            self.settle_attempt(&subjects, Attempt::NotAGuess).await?;
        }
        outcome
    }

    async fn login_checked(
        &self,
        email: &str,
        password: String,
        second_factor: Option<String>,
        subjects: &[String],
        client: &ClientInfo,
    ) -> Result<SessionGrant, CommandError> {
        let row = sqlx::query(
            "SELECT c.user_id, c.password_hash, c.blocked, coalesce(t.enabled, false) AS two_factor
             FROM credentials c LEFT JOIN two_factor t USING (user_id) WHERE c.email = $1",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        let (user_id, stored, blocked, two_factor) = match &row {
            Some(r) => (
                Some(r.try_get::<Uuid, _>("user_id")?),
                Some(r.try_get::<String, _>("password_hash")?),
                r.try_get::<bool, _>("blocked")?,
                r.try_get::<bool, _>("two_factor")?,
            ),
            None => (None, None, false, false),
        };
        let ok = self.verify_password(stored, password).await?;
        let Some(user_id) = user_id.filter(|_| ok) else {
            let reason = if user_id.is_some() { LoginFailure::WrongPassword } else { LoginFailure::UnknownEmail };
            self.login_failed(user_id, email, reason, subjects, Attempt::Failed, client).await?;
            return Err(CommandError::InvalidCredentials);
        };
        // Checked only after the password, so a guesser learns nothing about blocks.
        if blocked {
            self.login_failed(Some(user_id), email, LoginFailure::UserBlocked, subjects, Attempt::NotAGuess, client)
                .await?;
            return Err(CommandError::UserBlocked);
        }
        let mut tx = self.pool.begin().await?;
        let used = if two_factor {
            let Some(code) = second_factor.filter(|c| !c.trim().is_empty()) else {
                tx.rollback().await?;
                let reason = LoginFailure::TwoFactorRequired;
                self.login_failed(Some(user_id), email, reason, subjects, Attempt::NotAGuess, client).await?;
                return Err(CommandError::TwoFactorRequired);
            };
            match self.check_second_factor(&mut tx, user_id, &code).await? {
                Some(kind) => Some(kind),
                None => {
                    tx.rollback().await?;
                    let reason = LoginFailure::TwoFactorInvalid;
                    self.login_failed(Some(user_id), email, reason, subjects, Attempt::Failed, client).await?;
                    return Err(CommandError::TwoFactorInvalid);
                }
            }
        } else {
            None
        };
        settle_attempt(&mut tx, subjects, Attempt::Succeeded).await?;
        let grant = self.open_session(&mut tx, user_id, client).await?;
        record_security_event(
            &mut tx,
            &self.event_mac,
            Event::UserLoggedIn(UserLoggedIn { user_id, session_id: grant.session_id, second_factor: used }),
            Some(user_id),
            client,
        )
        .await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(grant)
    }

    /// Counts an attempt in flight for each subject, or refuses it while the
    /// subjects are backing off. Attempts in flight count, so a burst of
    /// parallel guesses cannot all pass before the first failure is recorded.
    async fn reserve_attempt(&self, subjects: &[String]) -> Result<(), CommandError> {
        let mut tx = self.pool.begin().await?;
        let mut sorted = subjects.to_vec();
        sorted.sort();
        let mut wait = 0i64;
        for subject in &sorted {
            sqlx::query(
                "INSERT INTO login_throttle (subject, failures, pending, last_failure_at)
                 VALUES ($1, 0, 0, 'epoch') ON CONFLICT (subject) DO NOTHING",
            )
            .bind(subject)
            .execute(&mut *tx)
            .await?;
            let row = sqlx::query(
                "SELECT failures, pending,
                        coalesce(extract(epoch FROM (now() - last_failure_at))::float8, 'Infinity') AS age
                 FROM login_throttle WHERE subject = $1 FOR UPDATE",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
            let age: f64 = row.try_get("age")?;
            let failures = if age > FAILURE_MEMORY_SECONDS as f64 { 0 } else { row.try_get::<i32, _>("failures")? };
            let pending: i32 = row.try_get("pending")?;
            let n = (failures.max(0) + pending.max(0)) as u32;
            let backoff = backoff_seconds(n, self.policy.failures_before_backoff);
            let remaining = if pending > 0 && backoff > 0 {
                // Guesses still in flight: wait for them as if they had failed.
                backoff
            } else {
                (backoff as f64 - age).ceil() as i64
            };
            wait = wait.max(remaining);
        }
        if wait > 0 {
            tx.rollback().await?;
            return Err(CommandError::TooManyAttempts { retry_after: wait as u64 });
        }
        sqlx::query(
            "UPDATE login_throttle SET pending = pending + 1,
                 failures = CASE WHEN last_failure_at < now() - make_interval(secs => $2) THEN 0 ELSE failures END
             WHERE subject = ANY($1)",
        )
        .bind(&sorted)
        .bind(FAILURE_MEMORY_SECONDS as f64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn settle_attempt(&self, subjects: &[String], attempt: Attempt) -> Result<(), CommandError> {
        let mut tx = self.pool.begin().await?;
        settle_attempt(&mut tx, subjects, attempt).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a refused login (never the password tried) and settles its attempt.
    async fn login_failed(
        &self,
        user_id: Option<Uuid>,
        email: &str,
        reason: LoginFailure,
        subjects: &[String],
        attempt: Attempt,
        client: &ClientInfo,
    ) -> Result<(), CommandError> {
        let mut tx = self.pool.begin().await?;
        settle_attempt(&mut tx, subjects, attempt).await?;
        let email: String = email.chars().take(254).collect();
        // Personal data: sealed with the user's key, or a pseudonym for nobody's address.
        let event = match user_id {
            Some(id) => {
                seal_event(&mut tx, &self.secrets, id, Event::LoginFailed(LoginFailed { user_id, email, reason }))
                    .await?
            }
            None => Event::LoginFailed(LoginFailed {
                user_id,
                email: crate::personal::pseudonym(&self.pseudonym_key, &email),
                reason,
            }),
        };
        // Whoever tried is unknown: the actor is anonymous, the user only the subject.
        record_security_event(&mut tx, &self.event_mac, event, None, client).await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(())
    }

    /// Checks a password off the async runtime, at most a few at a time: each
    /// argon2id check holds 19 MiB.
    async fn verify_password(&self, stored: Option<String>, password: String) -> Result<bool, CommandError> {
        let _permit = self.hashing.acquire().await.map_err(|_| CommandError::Hashing)?;
        tokio::task::spawn_blocking(move || passwords::verify(stored.as_deref(), &password))
            .await
            .map_err(|_| CommandError::Hashing)
    }

    async fn hash_password(&self, password: String) -> Result<String, CommandError> {
        let _permit = self.hashing.acquire().await.map_err(|_| CommandError::Hashing)?;
        tokio::task::spawn_blocking(move || passwords::hash(&password))
            .await
            .map_err(|_| CommandError::Hashing)?
            .map_err(|_| CommandError::Hashing)
    }

    /// The current password of a signed-in user, throttled like a login.
    async fn check_current_password(
        &self,
        user_id: Uuid,
        password: String,
        client: &ClientInfo,
    ) -> Result<(), CommandError> {
        let email: Option<String> = sqlx::query_scalar("SELECT email FROM credentials WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(email) = email else { return Err(CommandError::Rejected(DomainError::UserNotFound(user_id))) };
        let subjects = throttle_subjects(&email, client);
        self.reserve_attempt(&subjects).await?;
        let stored: Option<String> = sqlx::query_scalar("SELECT password_hash FROM credentials WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        match self.verify_password(stored, password).await {
            Ok(true) => {
                self.settle_attempt(&subjects, Attempt::Succeeded).await?;
                Ok(())
            }
            Ok(false) => {
                let reason = LoginFailure::WrongPassword;
                self.login_failed(Some(user_id), &email, reason, &subjects, Attempt::Failed, client).await?;
                Err(CommandError::WrongPassword)
            }
            Err(e) => {
                self.settle_attempt(&subjects, Attempt::NotAGuess).await?;
                Err(e)
            }
        }
    }

    /// A TOTP code (once per time step) or an unused recovery code.
    async fn check_second_factor(
        &self,
        conn: &mut PgConnection,
        user_id: Uuid,
        code: &str,
    ) -> Result<Option<SecondFactor>, CommandError> {
        let row = sqlx::query("SELECT secret_sealed, last_step FROM two_factor WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let secret = self.secrets.open(user_id, &row.try_get::<Vec<u8>, _>("secret_sealed")?)?;
        let last_step: i64 = row.try_get("last_step")?;
        if let Some(step) = totp::verify(&secret, code, unix_now(), last_step.max(0) as u64) {
            sqlx::query("UPDATE two_factor SET last_step = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(step as i64)
                .execute(&mut *conn)
                .await?;
            return Ok(Some(SecondFactor::Totp));
        }
        let used = sqlx::query(
            "UPDATE recovery_codes SET used_at = now() WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
        )
        .bind(user_id)
        .bind(token_hash(&normalize_recovery_code(code)))
        .execute(&mut *conn)
        .await?;
        Ok((used.rows_affected() == 1).then_some(SecondFactor::RecoveryCode))
    }

    async fn open_session(
        &self,
        conn: &mut PgConnection,
        user_id: Uuid,
        client: &ClientInfo,
    ) -> Result<SessionGrant, CommandError> {
        let session_id = Uuid::now_v7();
        let lifetime = Span::from_std(self.policy.refresh_token_lifetime).unwrap_or(Span::days(30));
        let expires_at = Utc::now() + lifetime;
        sqlx::query(
            "INSERT INTO sessions (session_id, user_id, expires_at, user_agent, client_ip) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(expires_at)
        .bind(client.user_agent.as_deref().map(|ua| ua.chars().take(300).collect::<String>()))
        .bind(&client.ip)
        .execute(&mut *conn)
        .await?;
        let refresh_token = self.issue_refresh_token(conn, session_id).await?;
        Ok(SessionGrant { user_id, session_id, refresh_token, refresh_expires_in: lifetime.num_seconds() })
    }

    async fn issue_refresh_token(&self, conn: &mut PgConnection, session_id: Uuid) -> Result<String, CommandError> {
        let token = random_token(REFRESH_TOKEN_BYTES);
        let lifetime = Span::from_std(self.policy.refresh_token_lifetime).unwrap_or(Span::days(30));
        sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)")
            .bind(token_hash(&token))
            .bind(session_id)
            .bind(Utc::now() + lifetime)
            .execute(&mut *conn)
            .await?;
        Ok(token)
    }

    /// Rotates a refresh token. A token presented twice revokes its session.
    pub async fn refresh(&self, token: &str, client: &ClientInfo) -> Result<SessionGrant, CommandError> {
        let mut tx = self.pool.begin().await?;
        // The row lock orders concurrent refreshes with one token: the second sees it used.
        let row = sqlx::query(
            "SELECT r.session_id, r.used_at IS NOT NULL AS used, r.expires_at > now() AS fresh,
                    s.user_id, s.revoked_at IS NULL AND s.expires_at > now() AS active, c.blocked
             FROM refresh_tokens r JOIN sessions s USING (session_id) JOIN credentials c USING (user_id)
             WHERE r.token_hash = $1 FOR UPDATE OF r",
        )
        .bind(token_hash(token.trim()))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Err(CommandError::RefreshTokenInvalid) };
        let session_id: Uuid = row.try_get("session_id")?;
        let user_id: Uuid = row.try_get("user_id")?;
        if row.try_get::<bool, _>("used")? {
            revoke_session(&mut tx, user_id, session_id, "refresh-token-reused").await?;
            record_security_event(
                &mut tx,
                &self.event_mac,
                Event::RefreshTokenReused(RefreshTokenReused { user_id, session_id }),
                Some(user_id),
                client,
            )
            .await?;
            tx.commit().await?;
            self.appended.notify_one();
            return Err(CommandError::RefreshTokenReused);
        }
        if !row.try_get::<bool, _>("fresh")? || !row.try_get::<bool, _>("active")? {
            return Err(CommandError::RefreshTokenInvalid);
        }
        if row.try_get::<bool, _>("blocked")? {
            return Err(CommandError::UserBlocked);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
            .bind(token_hash(token.trim()))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE sessions SET last_used_at = now() WHERE session_id = $1")
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
        let refresh_token = self.issue_refresh_token(&mut tx, session_id).await?;
        tx.commit().await?;
        let lifetime = Span::from_std(self.policy.refresh_token_lifetime).unwrap_or(Span::days(30));
        Ok(SessionGrant { user_id, session_id, refresh_token, refresh_expires_in: lifetime.num_seconds() })
    }

    /// The session a refresh token belongs to, if the token is known (used or not).
    pub async fn session_of_refresh_token(&self, token: &str) -> Result<Option<(Uuid, Uuid)>, CommandError> {
        Ok(sqlx::query_as(
            "SELECT s.user_id, s.session_id FROM refresh_tokens r JOIN sessions s USING (session_id)
             WHERE r.token_hash = $1",
        )
        .bind(token_hash(token.trim()))
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Ends one session (logout) or all of the user's sessions (logout-all).
    pub async fn logout(
        &self,
        user_id: Uuid,
        session_id: Option<Uuid>,
        all: bool,
        client: &ClientInfo,
    ) -> Result<i64, CommandError> {
        let mut tx = self.pool.begin().await?;
        let ended = if all {
            revoke_sessions(&mut tx, user_id, None, "logout-all").await?
        } else {
            match session_id {
                Some(id) if revoke_session(&mut tx, user_id, id, "logout").await? => vec![id],
                _ => vec![],
            }
        };
        self.commit_with_event(
            tx,
            Event::LoggedOut(LoggedOut { user_id, session_ids: ended, all_sessions: all }),
            user_id,
            client,
        )
        .await
    }

    /// Ends one of the user's own sessions from the session list.
    pub async fn revoke_own_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        client: &ClientInfo,
    ) -> Result<i64, CommandError> {
        let mut tx = self.pool.begin().await?;
        if !revoke_session(&mut tx, user_id, session_id, "revoked-by-user").await? {
            return Err(CommandError::SessionNotFound);
        }
        self.commit_with_event(tx, Event::SessionRevoked(SessionRevoked { user_id, session_id }), user_id, client).await
    }

    /// Records a security event about `user_id` (who also acted) and commits.
    async fn commit_with_event(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        event: Event,
        user_id: Uuid,
        client: &ClientInfo,
    ) -> Result<i64, CommandError> {
        let position = record_security_event(&mut tx, &self.event_mac, event, Some(user_id), client).await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(position)
    }

    /// The user's live sessions, newest first.
    pub async fn sessions(&self, user_id: Uuid) -> Result<Vec<SessionView>, CommandError> {
        let rows = sqlx::query(
            "SELECT session_id, created_at, last_used_at, user_agent, client_ip FROM sessions
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() ORDER BY created_at DESC",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SessionView {
                    session_id: r.try_get("session_id")?,
                    created_at: r.try_get("created_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                    user_agent: r.try_get("user_agent")?,
                    client_ip: r.try_get("client_ip")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(CommandError::from)
    }

    /// The per-request check behind an access token: the user still exists,
    /// the session is live, and the current role and block. Concurrent checks
    /// are read together when the ledger batches them (`session_checks`).
    pub async fn check_session(&self, user_id: Uuid, session_id: Uuid) -> Result<CredentialCheck, CommandError> {
        if let Some(checks) = &self.session_checks {
            if let Some(answer) = checks.check(user_id, session_id).await {
                return Ok(answer);
            }
        }
        // Alone: the batch's statement over one pair, so both paths answer alike.
        let mut answers = crate::session_checks::check_all(&self.pool, &[(user_id, session_id)]).await?;
        Ok(answers.pop().unwrap_or(CredentialCheck::Ended))
    }

    /// Changes the password and revokes every other session of the user.
    pub async fn change_password(
        &self,
        user_id: Uuid,
        current_session: Option<Uuid>,
        current_password: String,
        new_password: String,
        client: &ClientInfo,
    ) -> Result<i64, CommandError> {
        user::check_password(&new_password).map_err(|e| match e {
            DomainError::Validation { message, .. } => DomainError::validation("new_password", message),
            other => other,
        })?;
        self.check_current_password(user_id, current_password, client).await?;
        let hash = self.hash_password(new_password).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE credentials SET password_hash = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        revoke_sessions(&mut tx, user_id, current_session, "password-changed").await?;
        let (position, _) = record_user_change(
            &mut tx,
            &self.event_mac,
            user_id,
            UserCommand::ChangePassword { user_id },
            user_id,
            client,
        )
        .await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(position)
    }

    /// Starts TOTP set-up: a new secret, sealed, not yet enabled.
    pub async fn two_factor_setup(&self, user_id: Uuid) -> Result<TwoFactorSetup, CommandError> {
        let row = sqlx::query(
            "SELECT c.email, coalesce(t.enabled, false) AS enabled
             FROM credentials c LEFT JOIN two_factor t USING (user_id) WHERE c.user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Err(CommandError::Rejected(DomainError::UserNotFound(user_id))) };
        if row.try_get::<bool, _>("enabled")? {
            return Err(CommandError::Rejected(DomainError::TwoFactorAlreadyEnabled));
        }
        let email: String = row.try_get("email")?;
        let secret = random_bytes(20);
        let sealed = self.secrets.seal(user_id, &secret)?;
        sqlx::query(
            "INSERT INTO two_factor (user_id, secret_sealed, enabled, last_step) VALUES ($1, $2, false, 0)
             ON CONFLICT (user_id) DO UPDATE SET secret_sealed = $2, last_step = 0, created_at = now()
             WHERE NOT two_factor.enabled",
        )
        .bind(user_id)
        .bind(&sealed)
        .execute(&self.pool)
        .await?;
        let secret_base32 = data_encoding::BASE32_NOPAD.encode(&secret);
        let otpauth_uri = totp::otpauth_uri(TOTP_ISSUER, &email, &secret_base32);
        Ok(TwoFactorSetup { secret_base32, otpauth_uri })
    }

    /// Turns TOTP on with a first valid code; returns the recovery codes, once.
    pub async fn two_factor_confirm(
        &self,
        user_id: Uuid,
        code: &str,
        client: &ClientInfo,
    ) -> Result<(Vec<String>, i64), CommandError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT secret_sealed, enabled, last_step FROM two_factor WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Err(CommandError::TwoFactorNotSetUp) };
        if row.try_get::<bool, _>("enabled")? {
            return Err(CommandError::Rejected(DomainError::TwoFactorAlreadyEnabled));
        }
        let secret = self.secrets.open(user_id, &row.try_get::<Vec<u8>, _>("secret_sealed")?)?;
        let last_step: i64 = row.try_get("last_step")?;
        let Some(step) = totp::verify(&secret, code, unix_now(), last_step.max(0) as u64) else {
            return Err(CommandError::TwoFactorInvalid);
        };
        sqlx::query("UPDATE two_factor SET enabled = true, last_step = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(step as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| recovery_code()).collect();
        let hashes: Vec<Vec<u8>> = codes.iter().map(|c| token_hash(c)).collect();
        sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) SELECT $1, UNNEST($2::bytea[])")
            .bind(user_id)
            .bind(&hashes)
            .execute(&mut *tx)
            .await?;
        let (position, _) = record_user_change(
            &mut tx,
            &self.event_mac,
            user_id,
            UserCommand::EnableTwoFactor { user_id },
            user_id,
            client,
        )
        .await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok((codes, position))
    }

    /// Turns TOTP off; needs the password and a current code (or recovery code).
    pub async fn two_factor_disable(
        &self,
        user_id: Uuid,
        password: String,
        code: &str,
        client: &ClientInfo,
    ) -> Result<i64, CommandError> {
        self.check_current_password(user_id, password, client).await?;
        let mut tx = self.pool.begin().await?;
        let enabled: Option<bool> = sqlx::query_scalar("SELECT enabled FROM two_factor WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
        if enabled != Some(true) {
            return Err(CommandError::Rejected(DomainError::TwoFactorNotEnabled));
        }
        if self.check_second_factor(&mut tx, user_id, code).await?.is_none() {
            return Err(CommandError::TwoFactorInvalid);
        }
        sqlx::query("DELETE FROM two_factor WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
        let (position, _) = record_user_change(
            &mut tx,
            &self.event_mac,
            user_id,
            UserCommand::DisableTwoFactor { user_id },
            user_id,
            client,
        )
        .await?;
        tx.commit().await?;
        self.appended.notify_one();
        Ok(position)
    }

    /// Creates an API key; the secret is in the answer only.
    pub async fn create_api_key(
        &self,
        user_id: Uuid,
        name: &str,
        scopes: Vec<ApiScope>,
        client: &ClientInfo,
    ) -> Result<(NewApiKey, i64), CommandError> {
        let name = name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(DomainError::validation("name", "must be 1 to 100 characters").into());
        }
        let mut scopes = scopes;
        scopes.sort_by_key(|s| matches!(s, ApiScope::Write));
        scopes.dedup();
        if scopes.is_empty() {
            return Err(DomainError::validation("scopes", "must name at least one of \"read\", \"write\"").into());
        }
        let key = format!("{API_KEY_PREFIX}{}", random_token(32));
        let key_id = Uuid::now_v7();
        let key_prefix: String = key.chars().take(10).collect();
        let scope_names: Vec<&str> = scopes.iter().map(|s| scope_name(*s)).collect();
        let mut tx = self.pool.begin().await?;
        let created_at: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO api_keys (key_id, user_id, name, scopes, key_hash, key_prefix)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
        )
        .bind(key_id)
        .bind(user_id)
        .bind(&name)
        .bind(&scope_names)
        .bind(token_hash(&key))
        .bind(&key_prefix)
        .fetch_one(&mut *tx)
        .await?;
        let position = record_security_event(
            &mut tx,
            &self.event_mac,
            Event::ApiKeyCreated(ApiKeyCreated { user_id, key_id, name: name.clone(), scopes: scopes.clone() }),
            Some(user_id),
            client,
        )
        .await?;
        tx.commit().await?;
        self.appended.notify_one();
        let view = ApiKeyView { key_id, name, scopes, key_prefix, created_at, revoked_at: None };
        Ok((NewApiKey { view, key }, position))
    }

    pub async fn api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyView>, CommandError> {
        let rows = sqlx::query(
            "SELECT key_id, name, scopes, key_prefix, created_at, revoked_at FROM api_keys
             WHERE user_id = $1 ORDER BY created_at DESC",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let scopes: Vec<String> = r.try_get("scopes")?;
                Ok(ApiKeyView {
                    key_id: r.try_get("key_id")?,
                    name: r.try_get("name")?,
                    scopes: scopes.iter().filter_map(|s| parse_scope(s)).collect(),
                    key_prefix: r.try_get("key_prefix")?,
                    created_at: r.try_get("created_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(CommandError::from)
    }

    pub async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid, client: &ClientInfo) -> Result<i64, CommandError> {
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if revoked.rows_affected() != 1 {
            return Err(CommandError::ApiKeyNotFound);
        }
        self.commit_with_event(tx, Event::ApiKeyRevoked(ApiKeyRevoked { user_id, key_id }), user_id, client).await
    }

    /// The per-request check behind an API key.
    pub async fn check_api_key(&self, key: &str) -> Result<Option<ApiKeyPrincipal>, CommandError> {
        let row = sqlx::query(
            "SELECT k.key_id, k.user_id, k.scopes, c.role, c.blocked FROM api_keys k JOIN credentials c USING (user_id)
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(token_hash(key))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let scopes: Vec<String> = row.try_get("scopes")?;
        Ok(Some(ApiKeyPrincipal {
            key_id: row.try_get("key_id")?,
            scopes: scopes.iter().filter_map(|s| parse_scope(s)).collect(),
            principal: principal(row.try_get("user_id")?, &row)?,
        }))
    }

    /// An event's personal fields as readers may see them: opened, or
    /// `[erased]` for a forgotten user. `None` for events without any.
    pub async fn reveal_personal(
        &self,
        event_type: &str,
        payload: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, CommandError> {
        let mut conn = self.pool.acquire().await?;
        Ok(crate::personal::reveal(&mut conn, &self.secrets, event_type, payload).await?)
    }

    /// The owner of a live API key, for re-checking long-lived connections.
    pub async fn api_key_status(&self, key_id: Uuid) -> Result<Option<Principal>, CommandError> {
        let row = sqlx::query(
            "SELECT k.user_id, c.role, c.blocked FROM api_keys k JOIN credentials c USING (user_id)
             WHERE k.key_id = $1 AND k.revoked_at IS NULL",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| principal(r.try_get("user_id")?, &r)).transpose().map_err(CommandError::from)
    }

    /// Users for the admin list, searched by a fragment of the email, by id order.
    pub async fn users(&self, query: &str, after: Option<Uuid>, limit: i64) -> Result<Vec<UserSummary>, CommandError> {
        let pattern =
            format!("%{}%", query.trim().to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
        let rows = sqlx::query(
            "SELECT c.user_id, c.email, c.role, c.blocked, c.created_at, coalesce(t.enabled, false) AS two_factor
             FROM credentials c LEFT JOIN two_factor t USING (user_id)
             WHERE c.email LIKE $1 AND ($2::uuid IS NULL OR c.user_id > $2)
             ORDER BY c.user_id LIMIT $3",
        )
        .bind(pattern)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary).collect::<Result<_, sqlx::Error>>().map_err(CommandError::from)
    }

    pub async fn user(&self, user_id: Uuid) -> Result<Option<UserSummary>, CommandError> {
        let row = sqlx::query(
            "SELECT c.user_id, c.email, c.role, c.blocked, c.created_at, coalesce(t.enabled, false) AS two_factor
             FROM credentials c LEFT JOIN two_factor t USING (user_id) WHERE c.user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(summary).transpose().map_err(CommandError::from)
    }

    /// The user id registered under an email, for the CLI.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<Uuid>, CommandError> {
        let email = user::normalize_email(email)?;
        Ok(sqlx::query_scalar("SELECT user_id FROM credentials WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?)
    }
}

fn summary(r: &sqlx::postgres::PgRow) -> Result<UserSummary, sqlx::Error> {
    Ok(UserSummary {
        user_id: r.try_get("user_id")?,
        email: r.try_get("email")?,
        role: Role::parse(r.try_get("role")?).unwrap_or_default(),
        blocked: r.try_get("blocked")?,
        created_at: r.try_get("created_at")?,
        two_factor: r.try_get("two_factor")?,
    })
}

/// A session check's answer from its row (role, blocked, active). The block
/// is reported even though blocking also ended the sessions: the client
/// should learn why, not just that it must log in again.
pub(crate) fn credential_check(user_id: Uuid, row: &sqlx::postgres::PgRow) -> Result<CredentialCheck, sqlx::Error> {
    let principal = principal(user_id, row)?;
    if principal.blocked || row.try_get::<bool, _>("active")? {
        Ok(CredentialCheck::Valid(principal))
    } else {
        Ok(CredentialCheck::Ended)
    }
}

fn principal(user_id: Uuid, row: &sqlx::postgres::PgRow) -> Result<Principal, sqlx::Error> {
    Ok(Principal {
        user_id,
        role: Role::parse(row.try_get("role")?).unwrap_or_default(),
        blocked: row.try_get("blocked")?,
    })
}

pub fn scope_name(scope: ApiScope) -> &'static str {
    match scope {
        ApiScope::Read => "read",
        ApiScope::Write => "write",
    }
}

pub fn parse_scope(name: &str) -> Option<ApiScope> {
    match name {
        "read" => Some(ApiScope::Read),
        "write" => Some(ApiScope::Write),
        _ => None,
    }
}

/// An event with its personal fields sealed with the user's key.
async fn seal_event(
    conn: &mut PgConnection,
    secrets: &crate::secrets::SecretBox,
    user_id: Uuid,
    event: Event,
) -> Result<Event, CommandError> {
    if crate::personal::personal_fields(event.event_type()).is_empty() {
        return Ok(event);
    }
    let mut payload = event.payload();
    crate::personal::seal_payload(conn, secrets, user_id, event.event_type(), &mut payload).await?;
    Event::from_stored(event.event_type(), event.schema_version(), payload)
        .map_err(|e| CommandError::Store(crate::store::StoreError::Decode(e)))
}

/// How an attempt ended, for the throttle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// A wrong password or code: it counts.
    Failed,
    /// The right password: the email's count is forgotten. The IP's count
    /// stays, so one good account does not reset a spray from its address.
    Succeeded,
    /// Not a guess (a missing second factor, a blocked user, a fault).
    NotAGuess,
}

async fn settle_attempt(conn: &mut PgConnection, subjects: &[String], attempt: Attempt) -> Result<(), sqlx::Error> {
    match attempt {
        Attempt::Failed => {
            sqlx::query(
                "UPDATE login_throttle SET pending = greatest(pending - 1, 0), failures = failures + 1,
                     last_failure_at = now() WHERE subject = ANY($1)",
            )
            .bind(subjects)
            .execute(&mut *conn)
            .await?;
        }
        Attempt::Succeeded | Attempt::NotAGuess => {
            sqlx::query("UPDATE login_throttle SET pending = greatest(pending - 1, 0) WHERE subject = ANY($1)")
                .bind(subjects)
                .execute(&mut *conn)
                .await?;
            if attempt == Attempt::Succeeded {
                if let Some(email_subject) = subjects.first() {
                    sqlx::query("UPDATE login_throttle SET failures = 0 WHERE subject = $1")
                        .bind(email_subject)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
    }
    Ok(())
}

fn unix_now() -> u64 {
    Utc::now().timestamp().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_the_threshold_and_doubles_to_a_cap() {
        assert_eq!(backoff_seconds(4, 5), 0);
        assert_eq!(backoff_seconds(5, 5), 2);
        assert_eq!(backoff_seconds(6, 5), 4);
        assert_eq!(backoff_seconds(9, 5), 32);
        assert_eq!(backoff_seconds(40, 5), MAX_BACKOFF_SECONDS);
    }

    #[test]
    fn recovery_codes_are_four_groups_of_five() {
        let code = recovery_code();
        assert_eq!(code.len(), 23);
        assert_eq!(code.matches('-').count(), 3);
        assert_eq!(normalize_recovery_code(&format!(" {} ", code.to_uppercase())), code);
    }
}
