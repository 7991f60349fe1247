//! Holds (two-phase transfers): reserve funds on an account, then capture up
//! to the held amount to the payee, release them, or let them expire. A hold
//! is resolved exactly once: every decision here requires it to be pending.
//!
//! Hold events live in the held account's stream, so they are versioned with
//! its debits: a hold, a capture and a withdrawal cannot overdraw it together.

use crate::account::{check_available, check_pair, check_reference, AccountState, HoldStatus};
use crate::events::{
    Channel, Event, HoldCaptured, HoldExpired, HoldPlaced, HoldReleased, TransferKind, TransferRecorded,
};
use crate::money::Amount;
use crate::DomainError;
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

pub const DEFAULT_HOLD_SECONDS: i64 = 15 * 60;
pub const MAX_HOLD_SECONDS: i64 = 30 * 24 * 3600;

#[derive(Clone, Debug)]
pub struct PlaceHold {
    pub hold_id: Uuid,
    pub initiated_by: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Amount,
    /// Seconds until it expires; default 15 minutes, at most 30 days.
    pub expires_in_seconds: Option<i64>,
    pub reference: Option<String>,
    pub order_id: Option<Uuid>,
    pub now: DateTime<Utc>,
}

pub fn decide_place(from: &AccountState, to: &AccountState, command: PlaceHold) -> Result<Vec<Event>, DomainError> {
    let PlaceHold {
        hold_id,
        initiated_by,
        from_account,
        to_account,
        amount,
        expires_in_seconds,
        reference,
        order_id,
        now,
    } = command;
    let reference = check_reference(reference)?;
    let seconds = expires_in_seconds.unwrap_or(DEFAULT_HOLD_SECONDS);
    if !(1..=MAX_HOLD_SECONDS).contains(&seconds) {
        return Err(DomainError::validation(
            "expires_in_seconds",
            format!("must be between 1 and {MAX_HOLD_SECONDS} (30 days)"),
        ));
    }
    if !from.is_owned_by(initiated_by) {
        return Err(DomainError::AccountNotFound(from_account));
    }
    let currency = check_pair(from, to, from_account, to_account)?;
    let amount = amount.in_currency("amount", currency)?;
    check_available(from, from_account, amount, currency)?;
    Ok(vec![Event::HoldPlaced(HoldPlaced {
        hold_id,
        from_account,
        to_account,
        amount,
        currency: currency.code().to_owned(),
        expires_at: now + Duration::seconds(seconds),
        reference,
        order_id,
    })])
}

/// A pending hold that has not reached its expiry, or `hold-not-pending`.
fn pending(from: &AccountState, hold_id: Uuid, now: DateTime<Utc>) -> Result<&crate::account::Hold, DomainError> {
    let hold = from.holds.get(&hold_id).ok_or(DomainError::HoldNotFound(hold_id))?;
    if hold.status != HoldStatus::Pending || now >= hold.expires_at {
        return Err(DomainError::HoldNotPending(hold_id));
    }
    Ok(hold)
}

/// Whether `user` is a party to the hold (owns the held or the paid account).
pub fn is_party(from: &AccountState, to: &AccountState, user: Uuid) -> bool {
    from.is_owned_by(user) || to.is_owned_by(user)
}

#[derive(Clone, Debug)]
pub struct CaptureHold {
    pub hold_id: Uuid,
    /// Up to the held amount; the whole hold when absent.
    pub amount: Option<Amount>,
    pub transfer_id: Uuid,
    pub now: DateTime<Utc>,
}

/// Captures up to the held amount; the rest is released at once.
pub fn decide_capture(from: &AccountState, to: &AccountState, command: CaptureHold) -> Result<Vec<Event>, DomainError> {
    let CaptureHold { hold_id, amount, transfer_id, now } = command;
    let hold = pending(from, hold_id, now)?;
    let from_account = from.opened.as_ref().map(|a| a.account_id).ok_or(DomainError::HoldNotFound(hold_id))?;
    let currency = check_pair(from, to, from_account, hold.to_account)?;
    let captured = match amount {
        Some(a) => a.in_currency("amount", currency)?,
        None => hold.amount,
    };
    if captured > hold.amount {
        return Err(DomainError::validation("amount", format!("exceeds the held {}", hold.amount)));
    }
    Ok(vec![
        Event::HoldCaptured(HoldCaptured {
            hold_id,
            from_account,
            to_account: hold.to_account,
            amount: captured,
            released: hold.amount - captured,
            transfer_id,
        }),
        Event::TransferRecorded(TransferRecorded {
            transfer_id,
            from_account,
            to_account: hold.to_account,
            amount: captured,
            currency: currency.code().to_owned(),
            kind: TransferKind::HoldCapture,
            reference: Some(format!("hold {hold_id}")),
            channel: Channel::Api,
        }),
    ])
}

pub fn decide_release(from: &AccountState, hold_id: Uuid, now: DateTime<Utc>) -> Result<Vec<Event>, DomainError> {
    pending(from, hold_id, now)?;
    let from_account = from.opened.as_ref().map(|a| a.account_id).ok_or(DomainError::HoldNotFound(hold_id))?;
    Ok(vec![Event::HoldReleased(HoldReleased { hold_id, from_account })])
}

/// Expires a pending hold whose time has come; anything else is refused, so
/// several schedulers racing append one expiry at most.
pub fn decide_expire(from: &AccountState, hold_id: Uuid, now: DateTime<Utc>) -> Result<Vec<Event>, DomainError> {
    let hold = from.holds.get(&hold_id).ok_or(DomainError::HoldNotFound(hold_id))?;
    if hold.status != HoldStatus::Pending || now < hold.expires_at {
        return Err(DomainError::HoldNotPending(hold_id));
    }
    let from_account = from.opened.as_ref().map(|a| a.account_id).ok_or(DomainError::HoldNotFound(hold_id))?;
    Ok(vec![Event::HoldExpired(HoldExpired { hold_id, from_account })])
}

/// The amount a hold reserves, for read models and checks.
pub fn held(from: &AccountState, hold_id: Uuid) -> Option<Decimal> {
    from.holds.get(&hold_id).map(|h| h.amount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::{evolve, system_account_id};
    use crate::events::{AccountKind, AccountOpened};
    use crate::Currency;

    fn opened(account_id: Uuid, owner: Uuid) -> Event {
        Event::AccountOpened(AccountOpened {
            account_id,
            owner_id: Some(owner),
            currency: "USD".into(),
            kind: AccountKind::User,
            name: None,
        })
    }

    fn funded(account_id: Uuid, amount: &str) -> Event {
        Event::TransferRecorded(TransferRecorded {
            transfer_id: Uuid::new_v4(),
            from_account: system_account_id(Currency::from_code("USD").unwrap()),
            to_account: account_id,
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
            kind: TransferKind::Deposit,
            reference: None,
            channel: Channel::Api,
        })
    }

    fn given(events: &[Event]) -> AccountState {
        events.iter().fold(AccountState::default(), evolve)
    }

    struct World {
        ann: Uuid,
        a: Uuid,
        b: Uuid,
        history: Vec<Event>,
        shop: AccountState,
        now: DateTime<Utc>,
    }

    fn world(balance: &str) -> World {
        let (ann, bob, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        World {
            ann,
            a,
            b,
            history: vec![opened(a, ann), funded(a, balance)],
            shop: given(&[opened(b, bob)]),
            now: Utc::now(),
        }
    }

    fn place(w: &World, amount: &str, seconds: Option<i64>) -> Result<Vec<Event>, DomainError> {
        decide_place(
            &given(&w.history),
            &w.shop,
            PlaceHold {
                hold_id: Uuid::new_v4(),
                initiated_by: w.ann,
                from_account: w.a,
                to_account: w.b,
                amount: Amount::parse("amount", amount).unwrap(),
                expires_in_seconds: seconds,
                reference: None,
                order_id: None,
                now: w.now,
            },
        )
    }

    fn hold_id(events: &[Event]) -> Uuid {
        match &events[0] {
            Event::HoldPlaced(h) => h.hold_id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hold_counts_against_available_not_balance() {
        let mut w = world("10.00");
        let placed = place(&w, "7.00", None).unwrap();
        w.history.extend(placed);
        let state = given(&w.history);
        assert_eq!(state.balance, Decimal::new(1000, 2));
        assert_eq!(state.available(), Decimal::new(300, 2));
        assert!(
            matches!(place(&w, "3.01", None), Err(DomainError::InsufficientFunds { .. })),
            "a second hold sees the first"
        );
        assert!(place(&w, "3.00", None).is_ok());
    }

    #[test]
    fn expiry_defaults_to_fifteen_minutes_and_is_bounded() {
        let w = world("10.00");
        let Event::HoldPlaced(h) = &place(&w, "1.00", None).unwrap()[0] else { panic!() };
        assert_eq!(h.expires_at, w.now + Duration::seconds(900));
        assert!(matches!(place(&w, "1.00", Some(0)), Err(DomainError::Validation { .. })));
        assert!(matches!(place(&w, "1.00", Some(MAX_HOLD_SECONDS + 1)), Err(DomainError::Validation { .. })));
    }

    #[test]
    fn a_partial_capture_moves_part_and_releases_the_rest_once() {
        let mut w = world("10.00");
        let placed = place(&w, "6.00", None).unwrap();
        let id = hold_id(&placed);
        w.history.extend(placed);
        let capture = |w: &World, amount: &str| {
            decide_capture(
                &given(&w.history),
                &w.shop,
                CaptureHold {
                    hold_id: id,
                    amount: Some(Amount::parse("amount", amount).unwrap()),
                    transfer_id: Uuid::new_v4(),
                    now: w.now,
                },
            )
        };
        assert!(matches!(capture(&w, "6.01"), Err(DomainError::Validation { .. })), "captured <= held");
        let captured = capture(&w, "4.00").unwrap();
        let Event::HoldCaptured(c) = &captured[0] else { panic!() };
        assert_eq!((c.amount, c.released), (Decimal::new(400, 2), Decimal::new(200, 2)));
        w.history.extend(captured);
        let state = given(&w.history);
        assert_eq!(state.balance, Decimal::new(600, 2));
        assert_eq!(state.available(), Decimal::new(600, 2), "the rest is free again");
        assert_eq!(capture(&w, "1.00"), Err(DomainError::HoldNotPending(id)), "captured once");
        assert_eq!(decide_release(&state, id, w.now), Err(DomainError::HoldNotPending(id)));
    }

    #[test]
    fn a_double_release_is_refused() {
        let mut w = world("10.00");
        let placed = place(&w, "6.00", None).unwrap();
        let id = hold_id(&placed);
        w.history.extend(placed);
        let released = decide_release(&given(&w.history), id, w.now).unwrap();
        w.history.extend(released);
        assert_eq!(given(&w.history).available(), Decimal::new(1000, 2));
        assert_eq!(decide_release(&given(&w.history), id, w.now), Err(DomainError::HoldNotPending(id)));
    }

    #[test]
    fn after_expiry_capture_and_release_are_refused_even_before_the_expiry_event() {
        let mut w = world("10.00");
        let placed = place(&w, "6.00", Some(60)).unwrap();
        let id = hold_id(&placed);
        w.history.extend(placed);
        let later = w.now + Duration::seconds(61);
        let state = given(&w.history);
        let capture = |s: &AccountState| {
            decide_capture(
                s,
                &w.shop,
                CaptureHold { hold_id: id, amount: None, transfer_id: Uuid::new_v4(), now: later },
            )
        };
        assert_eq!(capture(&state), Err(DomainError::HoldNotPending(id)));
        assert_eq!(decide_release(&state, id, later), Err(DomainError::HoldNotPending(id)));
        assert_eq!(decide_expire(&state, id, w.now), Err(DomainError::HoldNotPending(id)), "not yet due");
        let expired = decide_expire(&state, id, later).unwrap();
        w.history.extend(expired);
        let state = given(&w.history);
        assert_eq!(state.available(), Decimal::new(1000, 2));
        assert_eq!(decide_expire(&state, id, later), Err(DomainError::HoldNotPending(id)), "expires once");
        assert_eq!(capture(&state), Err(DomainError::HoldNotPending(id)));
    }

    #[test]
    fn a_refused_hold_cannot_be_captured() {
        let w = world("1.00");
        assert!(matches!(place(&w, "5.00", None), Err(DomainError::InsufficientFunds { .. })));
        let ghost = Uuid::new_v4();
        let capture = decide_capture(
            &given(&w.history),
            &w.shop,
            CaptureHold { hold_id: ghost, amount: None, transfer_id: Uuid::new_v4(), now: w.now },
        );
        assert_eq!(capture, Err(DomainError::HoldNotFound(ghost)));
    }
}
