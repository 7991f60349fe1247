//! The access policy, in one place: every handler states what it is about to
//! do and to whose data, and this decides. Roles come from the per-request
//! check in `auth`, ownership from the read model or the decider.
//!
//! - `user`: their own data only.
//! - `support`: reads anyone's data; changes nothing but their own.
//! - `admin`: support, plus the admin actions.
//! - Nobody moves money out of another user's account: the money deciders
//!   refuse a debit of an account the actor does not own, whatever the role.

use crate::auth::{AuthUser, Credential};
use crate::problem::Problem;
use axum::http::StatusCode;
use ledger_domain::events::Role;
use uuid::Uuid;

pub enum Action<'a> {
    /// Read data owned by these users (a transfer has two parties); system
    /// accounts have no owner and are staff-only. Denied as `hidden`, a 404,
    /// so that other users' ids reveal nothing.
    Read { owners: &'a [Option<Uuid>], hidden: fn() -> Problem },
    /// Manage the caller's own sessions, password, two-factor and API keys:
    /// needs a login session, not an API key.
    ManageOwnCredentials,
    /// List and inspect users.
    StaffRead,
    /// Block, unblock, change roles, freeze and unfreeze; needs a login session.
    Admin,
}

fn is_staff(role: Role) -> bool {
    matches!(role, Role::Support | Role::Admin)
}

fn needs_session(caller: &AuthUser) -> Result<(), Problem> {
    match caller.credential {
        Credential::Session { .. } => Ok(()),
        Credential::ApiKey { .. } => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            "this needs a login session; API keys cannot do it",
        )),
    }
}

fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

pub fn authorize(caller: &AuthUser, action: Action<'_>) -> Result<(), Problem> {
    match action {
        Action::Read { owners, hidden } => {
            if owners.contains(&Some(caller.user_id)) || is_staff(caller.role) {
                Ok(())
            } else {
                Err(hidden())
            }
        }
        Action::ManageOwnCredentials => needs_session(caller),
        Action::StaffRead => {
            if is_staff(caller.role) {
                Ok(())
            } else {
                Err(forbidden("this needs the support or admin role"))
            }
        }
        Action::Admin => {
            needs_session(caller)?;
            if caller.role == Role::Admin {
                Ok(())
            } else {
                Err(forbidden("this needs the admin role"))
            }
        }
    }
}
