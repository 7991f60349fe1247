//! The `security_activity` read model: each user's own security events, for
//! `GET /v1/me/activity`. Events about a user (a block by an admin, say) are
//! listed under that user, with the acting admin as `actor_id`.

use chrono::{DateTime, Utc};
use ledger_commands::store::RecordedEvent;
use ledger_domain::Event;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub const TABLES: &[&str] = &["security_activity"];

/// The user an identity event is about, if it is one.
fn subject(event: &Event) -> Option<Uuid> {
    match event {
        Event::UserRegistered(e) => Some(e.user_id),
        Event::RoleChanged(e) => Some(e.user_id),
        Event::UserBlocked(e) => Some(e.user_id),
        Event::UserUnblocked(e) => Some(e.user_id),
        Event::PasswordChanged(e) => Some(e.user_id),
        Event::TwoFactorEnabled(e) => Some(e.user_id),
        Event::TwoFactorDisabled(e) => Some(e.user_id),
        Event::UserLoggedIn(e) => Some(e.user_id),
        Event::LoginFailed(e) => e.user_id,
        Event::LoggedOut(e) => Some(e.user_id),
        Event::SessionRevoked(e) => Some(e.user_id),
        Event::RefreshTokenReused(e) => Some(e.user_id),
        Event::ApiKeyCreated(e) => Some(e.user_id),
        Event::ApiKeyRevoked(e) => Some(e.user_id),
        Event::UserForgotten(e) => Some(e.user_id),
        _ => None,
    }
}

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    let Some(user_id) = subject(event) else { return Ok(()) };
    // Failed logins are anonymous (whoever tried is unknown) but the user may
    // see where they came from; an admin's actions show the admin, not their address.
    let own = recorded.metadata.actor_id == Some(user_id) || matches!(event, Event::LoginFailed(_));
    // The detail is the payload without the user's id (the row has it).
    sqlx::query(
        "INSERT INTO security_activity (user_id, position, event_type, detail, actor_id, client_ip, user_agent, recorded_at)
         VALUES ($1, $2, $3, $4::jsonb - 'user_id', $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(recorded.position)
    .bind(&recorded.event_type)
    .bind(recorded.payload.as_json())
    .bind(recorded.metadata.actor_id)
    // Where an admin acted from is the admin's business, not the user's.
    .bind(own.then_some(&recorded.metadata.client_ip))
    .bind(own.then_some(&recorded.metadata.user_agent))
    .bind(recorded.metadata.recorded_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ActivityView {
    pub position: i64,
    pub event_type: String,
    pub detail: Value,
    pub actor_id: Option<Uuid>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

/// A page of a user's activity, newest first, before `before` (a position).
pub async fn of_user(
    pool: &PgPool,
    user_id: Uuid,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<ActivityView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT position, event_type, detail, actor_id, client_ip, user_agent, recorded_at FROM security_activity
         WHERE user_id = $1 AND ($2::bigint IS NULL OR position < $2) ORDER BY position DESC LIMIT $3",
    )
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}
