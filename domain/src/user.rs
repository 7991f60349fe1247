//! The user decider: registration, roles, blocking, password and two-factor changes.

use crate::account::check_reason;
use crate::events::{
    Event, PasswordChanged, Role, RoleChanged, TwoFactorDisabled, TwoFactorEnabled, UserBlocked, UserForgotten,
    UserRegistered, UserUnblocked,
};
use crate::DomainError;
use uuid::Uuid;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserState {
    pub registered: Option<UserRegistered>,
    pub role: Role,
    pub blocked: bool,
    pub two_factor: bool,
    pub forgotten: bool,
}

#[derive(Clone, Debug)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        email: String,
        display_name: Option<String>,
    },
    ChangeRole {
        user_id: Uuid,
        role: Role,
        reason: Option<String>,
    },
    Block {
        user_id: Uuid,
        reason: String,
    },
    Unblock {
        user_id: Uuid,
        reason: String,
    },
    ChangePassword {
        user_id: Uuid,
    },
    EnableTwoFactor {
        user_id: Uuid,
    },
    DisableTwoFactor {
        user_id: Uuid,
    },
    /// Destroys the user's personal-data key; an admin action with a reason.
    Forget {
        user_id: Uuid,
        reason: String,
    },
}

pub const MIN_PASSWORD_CHARS: usize = 10;
pub const MAX_PASSWORD_CHARS: usize = 1024;
const MAX_DISPLAY_NAME_CHARS: usize = 100;

/// Normalises and checks an email address: one `@`, a dotted domain, no spaces.
pub fn normalize_email(raw: &str) -> Result<String, DomainError> {
    let email = raw.trim().to_lowercase();
    let invalid = || DomainError::validation("email", "is not a valid email address");
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err(invalid());
    }
    Ok(email)
}

/// Password rules; the password itself never reaches an event.
pub fn check_password(password: &str) -> Result<(), DomainError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(DomainError::validation("password", format!("must be at least {MIN_PASSWORD_CHARS} characters")));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(DomainError::validation("password", format!("must be at most {MAX_PASSWORD_CHARS} characters")));
    }
    Ok(())
}

pub fn decide(state: &UserState, command: UserCommand) -> Result<Vec<Event>, DomainError> {
    match command {
        UserCommand::Register { user_id, email, display_name } => {
            if state.registered.is_some() {
                return Err(DomainError::UserAlreadyRegistered(user_id));
            }
            let email = normalize_email(&email)?;
            let display_name = display_name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
            if display_name.as_ref().is_some_and(|n| n.chars().count() > MAX_DISPLAY_NAME_CHARS) {
                return Err(DomainError::validation(
                    "display_name",
                    format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
                ));
            }
            Ok(vec![Event::UserRegistered(UserRegistered { user_id, email, display_name })])
        }
        UserCommand::ChangeRole { user_id, role, reason } => {
            registered(state, user_id)?;
            let reason = reason.as_deref().map(check_reason).transpose()?;
            if state.role == role {
                return Err(DomainError::validation("role", format!("is already {}", role.as_str())));
            }
            Ok(vec![Event::RoleChanged(RoleChanged { user_id, role, previous_role: state.role, reason })])
        }
        UserCommand::Block { user_id, reason } => {
            registered(state, user_id)?;
            let reason = check_reason(&reason)?;
            if state.blocked {
                return Err(DomainError::UserAlreadyBlocked(user_id));
            }
            Ok(vec![Event::UserBlocked(UserBlocked { user_id, reason })])
        }
        UserCommand::Unblock { user_id, reason } => {
            registered(state, user_id)?;
            let reason = check_reason(&reason)?;
            if !state.blocked {
                return Err(DomainError::UserNotBlocked(user_id));
            }
            Ok(vec![Event::UserUnblocked(UserUnblocked { user_id, reason })])
        }
        UserCommand::ChangePassword { user_id } => {
            registered(state, user_id)?;
            Ok(vec![Event::PasswordChanged(PasswordChanged { user_id })])
        }
        UserCommand::EnableTwoFactor { user_id } => {
            registered(state, user_id)?;
            if state.two_factor {
                return Err(DomainError::TwoFactorAlreadyEnabled);
            }
            Ok(vec![Event::TwoFactorEnabled(TwoFactorEnabled { user_id })])
        }
        UserCommand::Forget { user_id, reason } => {
            registered(state, user_id)?;
            let reason = check_reason(&reason)?;
            if state.forgotten {
                return Err(DomainError::validation("user_id", "is already forgotten"));
            }
            Ok(vec![Event::UserForgotten(UserForgotten { user_id, reason })])
        }
        UserCommand::DisableTwoFactor { user_id } => {
            registered(state, user_id)?;
            if !state.two_factor {
                return Err(DomainError::TwoFactorNotEnabled);
            }
            Ok(vec![Event::TwoFactorDisabled(TwoFactorDisabled { user_id })])
        }
    }
}

fn registered(state: &UserState, user_id: Uuid) -> Result<(), DomainError> {
    match &state.registered {
        Some(r) if r.user_id == user_id => Ok(()),
        _ => Err(DomainError::UserNotFound(user_id)),
    }
}

pub fn evolve(mut state: UserState, event: &Event) -> UserState {
    match event {
        Event::UserRegistered(e) => state.registered = Some(e.clone()),
        Event::RoleChanged(e) => state.role = e.role,
        Event::UserBlocked(_) => state.blocked = true,
        Event::UserUnblocked(_) => state.blocked = false,
        Event::TwoFactorEnabled(_) => state.two_factor = true,
        Event::TwoFactorDisabled(_) => state.two_factor = false,
        Event::UserForgotten(_) => state.forgotten = true,
        _ => {}
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(events: &[Event]) -> UserState {
        events.iter().fold(UserState::default(), evolve)
    }

    #[test]
    fn registering_records_a_normalised_email() {
        let id = Uuid::new_v4();
        let events = decide(
            &given(&[]),
            UserCommand::Register {
                user_id: id,
                email: "  Ann@Example.COM ".into(),
                display_name: Some(" Ann ".into()),
            },
        )
        .unwrap();
        assert_eq!(
            events,
            vec![Event::UserRegistered(UserRegistered {
                user_id: id,
                email: "ann@example.com".into(),
                display_name: Some("Ann".into()),
            })]
        );
    }

    #[test]
    fn registering_twice_is_refused() {
        let id = Uuid::new_v4();
        let first =
            decide(&given(&[]), UserCommand::Register { user_id: id, email: "a@b.io".into(), display_name: None })
                .unwrap();
        let err =
            decide(&given(&first), UserCommand::Register { user_id: id, email: "a@b.io".into(), display_name: None })
                .unwrap_err();
        assert_eq!(err, DomainError::UserAlreadyRegistered(id));
    }

    #[test]
    fn invalid_emails_are_refused_naming_the_field() {
        for bad in ["", "ann", "ann@", "@x.io", "a@b", "a b@c.io", "a@@b.io", "a@.io", "a@b..io"] {
            let err = decide(
                &given(&[]),
                UserCommand::Register { user_id: Uuid::new_v4(), email: bad.into(), display_name: None },
            )
            .unwrap_err();
            assert!(matches!(err, DomainError::Validation { ref field, .. } if field == "email"), "{bad}");
        }
    }

    #[test]
    fn short_passwords_are_refused() {
        assert!(check_password("123456789").is_err());
        assert!(check_password("1234567890").is_ok());
    }

    fn ann() -> (Uuid, Vec<Event>) {
        let id = Uuid::new_v4();
        let events =
            decide(&given(&[]), UserCommand::Register { user_id: id, email: "ann@b.io".into(), display_name: None })
                .unwrap();
        (id, events)
    }

    #[test]
    fn a_new_user_has_the_user_role_and_can_be_promoted_once() {
        let (id, history) = ann();
        assert_eq!(given(&history).role, Role::User);
        let events =
            decide(&given(&history), UserCommand::ChangeRole { user_id: id, role: Role::Admin, reason: None }).unwrap();
        assert_eq!(
            events,
            vec![Event::RoleChanged(RoleChanged {
                user_id: id,
                role: Role::Admin,
                previous_role: Role::User,
                reason: None
            })]
        );
        let promoted: Vec<Event> = history.into_iter().chain(events).collect();
        assert_eq!(given(&promoted).role, Role::Admin);
        let again = decide(&given(&promoted), UserCommand::ChangeRole { user_id: id, role: Role::Admin, reason: None });
        assert!(matches!(again, Err(DomainError::Validation { .. })));
    }

    #[test]
    fn blocking_needs_a_reason_and_happens_once() {
        let (id, history) = ann();
        let state = given(&history);
        let err = decide(&state, UserCommand::Block { user_id: id, reason: "".into() }).unwrap_err();
        assert_eq!(err, DomainError::validation("reason", "is required"));
        let blocked = decide(&state, UserCommand::Block { user_id: id, reason: "chargebacks".into() }).unwrap();
        let history: Vec<Event> = history.into_iter().chain(blocked).collect();
        assert!(given(&history).blocked);
        assert_eq!(
            decide(&given(&history), UserCommand::Block { user_id: id, reason: "again".into() }),
            Err(DomainError::UserAlreadyBlocked(id))
        );
        let lifted = decide(&given(&history), UserCommand::Unblock { user_id: id, reason: "resolved".into() }).unwrap();
        let history: Vec<Event> = history.into_iter().chain(lifted).collect();
        assert!(!given(&history).blocked);
        assert_eq!(
            decide(&given(&history), UserCommand::Unblock { user_id: id, reason: "x".into() }),
            Err(DomainError::UserNotBlocked(id))
        );
    }

    #[test]
    fn commands_on_an_unknown_user_are_refused() {
        let id = Uuid::new_v4();
        assert_eq!(
            decide(&given(&[]), UserCommand::Block { user_id: id, reason: "r".into() }),
            Err(DomainError::UserNotFound(id))
        );
        assert_eq!(
            decide(&given(&[]), UserCommand::ChangePassword { user_id: id }),
            Err(DomainError::UserNotFound(id))
        );
    }

    #[test]
    fn two_factor_turns_on_and_off_once_each() {
        let (id, history) = ann();
        assert_eq!(
            decide(&given(&history), UserCommand::DisableTwoFactor { user_id: id }),
            Err(DomainError::TwoFactorNotEnabled)
        );
        let on = decide(&given(&history), UserCommand::EnableTwoFactor { user_id: id }).unwrap();
        let history: Vec<Event> = history.into_iter().chain(on).collect();
        assert!(given(&history).two_factor);
        assert_eq!(
            decide(&given(&history), UserCommand::EnableTwoFactor { user_id: id }),
            Err(DomainError::TwoFactorAlreadyEnabled)
        );
        assert_eq!(
            decide(&given(&history), UserCommand::ChangePassword { user_id: id }).unwrap(),
            vec![Event::PasswordChanged(PasswordChanged { user_id: id })]
        );
    }
}
