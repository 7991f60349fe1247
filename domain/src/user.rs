//! The user decider: registration.

use crate::events::{Event, UserRegistered};
use crate::DomainError;
use uuid::Uuid;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserState {
    pub registered: Option<UserRegistered>,
}

#[derive(Clone, Debug)]
pub enum UserCommand {
    Register { user_id: Uuid, email: String, display_name: Option<String> },
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
    }
}

pub fn evolve(mut state: UserState, event: &Event) -> UserState {
    if let Event::UserRegistered(e) = event {
        state.registered = Some(e.clone());
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
}
