//! The account decider: opening accounts and moving money between them.
//!
//! A movement is decided against both accounts' states. The debit side is the
//! one with an invariant at stake (a user account never goes below zero), so the
//! command side appends the movement under the debit account's stream version.

use crate::events::{
    AccountFrozen, AccountKind, AccountOpened, AccountUnfrozen, Channel, Event, TransferKind, TransferRecorded,
};
use crate::fees::FeeRule;
use crate::money::Amount;
use crate::{Currency, DomainError};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Namespace for the deterministic ids of system accounts.
const SYSTEM_ACCOUNT_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d73_7973_7465_6d2d_6163);

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_REFERENCE_CHARS: usize = 200;

/// The id of a currency's system account: the same on every ledger instance.
pub fn system_account_id(currency: Currency) -> Uuid {
    Uuid::new_v5(&SYSTEM_ACCOUNT_NAMESPACE, currency.code().as_bytes())
}

/// The id of a currency's fee account, the system account fees are paid into.
pub fn fee_account_id(currency: Currency) -> Uuid {
    Uuid::new_v5(&SYSTEM_ACCOUNT_NAMESPACE, format!("{}:fees", currency.code()).as_bytes())
}

/// The id of the fee movement that goes with a movement.
pub fn fee_transfer_id(transfer_id: Uuid) -> Uuid {
    Uuid::new_v5(&transfer_id, b"fee")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldStatus {
    Pending,
    Captured,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Pending => "pending",
            HoldStatus::Captured => "captured",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }
}

/// A hold on this account, as the account's stream tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    pub amount: Decimal,
    pub to_account: Uuid,
    pub expires_at: DateTime<Utc>,
    pub order_id: Option<Uuid>,
    pub status: HoldStatus,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccountState {
    pub opened: Option<AccountOpened>,
    pub balance: Decimal,
    /// A frozen account refuses debits and credits.
    pub frozen: bool,
    /// Holds placed on this account, by id.
    pub holds: BTreeMap<Uuid, Hold>,
}

impl AccountState {
    pub fn is_owned_by(&self, user: Uuid) -> bool {
        self.opened.as_ref().is_some_and(|a| a.kind == AccountKind::User && a.owner_id == Some(user))
    }

    pub fn currency(&self) -> Option<Currency> {
        self.opened.as_ref().and_then(|a| Currency::from_code(&a.currency))
    }

    pub fn kind(&self) -> Option<AccountKind> {
        self.opened.as_ref().map(|a| a.kind)
    }

    /// Balance less the pending holds: what a debit or a new hold may use.
    pub fn available(&self) -> Decimal {
        self.balance
            - self.holds.values().filter(|h| h.status == HoldStatus::Pending).map(|h| h.amount).sum::<Decimal>()
    }

    fn id(&self) -> Option<Uuid> {
        self.opened.as_ref().map(|a| a.account_id)
    }
}

#[derive(Clone, Debug)]
pub enum AccountCommand {
    Open {
        account_id: Uuid,
        owner_id: Uuid,
        currency: String,
        name: Option<String>,
    },
    OpenSystem {
        currency: Currency,
    },
    /// The currency's fee account, a system account.
    OpenFeeAccount {
        currency: Currency,
    },
    /// By an admin; the reason is required.
    Freeze {
        account_id: Uuid,
        reason: String,
    },
    Unfreeze {
        account_id: Uuid,
        reason: String,
    },
}

pub const MAX_REASON_CHARS: usize = 500;

/// An admin's reason: required, trimmed, bounded.
pub fn check_reason(reason: &str) -> Result<String, DomainError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(DomainError::validation("reason", "is required"));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(DomainError::validation("reason", format!("must be at most {MAX_REASON_CHARS} characters")));
    }
    Ok(reason.to_owned())
}

pub fn decide(state: &AccountState, command: AccountCommand) -> Result<Vec<Event>, DomainError> {
    match command {
        AccountCommand::Open { account_id, owner_id, currency, name } => {
            if state.opened.is_some() {
                return Err(DomainError::AccountAlreadyOpened(account_id));
            }
            let currency = Currency::from_code(&currency)
                .ok_or_else(|| DomainError::validation("currency", "is not a known ISO 4217 currency code"))?;
            let name = name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
            if name.as_ref().is_some_and(|n| n.chars().count() > MAX_NAME_CHARS) {
                return Err(DomainError::validation("name", format!("must be at most {MAX_NAME_CHARS} characters")));
            }
            Ok(vec![Event::AccountOpened(AccountOpened {
                account_id,
                owner_id: Some(owner_id),
                currency: currency.code().to_owned(),
                kind: AccountKind::User,
                name,
            })])
        }
        AccountCommand::OpenSystem { currency } => {
            let account_id = system_account_id(currency);
            if state.opened.is_some() {
                return Err(DomainError::AccountAlreadyOpened(account_id));
            }
            Ok(vec![Event::AccountOpened(AccountOpened {
                account_id,
                owner_id: None,
                currency: currency.code().to_owned(),
                kind: AccountKind::System,
                name: Some(format!("{} system", currency.code())),
            })])
        }
        AccountCommand::OpenFeeAccount { currency } => {
            let account_id = fee_account_id(currency);
            if state.opened.is_some() {
                return Err(DomainError::AccountAlreadyOpened(account_id));
            }
            Ok(vec![Event::AccountOpened(AccountOpened {
                account_id,
                owner_id: None,
                currency: currency.code().to_owned(),
                kind: AccountKind::System,
                name: Some(format!("{} fees", currency.code())),
            })])
        }
        AccountCommand::Freeze { account_id, reason } => {
            let reason = check_reason(&reason)?;
            match state.kind() {
                None => Err(DomainError::AccountNotFound(account_id)),
                Some(AccountKind::System) => {
                    Err(DomainError::validation("account_id", "is a system account, which cannot be frozen"))
                }
                Some(AccountKind::User) if state.frozen => Err(DomainError::AccountAlreadyFrozen(account_id)),
                Some(AccountKind::User) => Ok(vec![Event::AccountFrozen(AccountFrozen { account_id, reason })]),
            }
        }
        AccountCommand::Unfreeze { account_id, reason } => {
            let reason = check_reason(&reason)?;
            match state.kind() {
                None => Err(DomainError::AccountNotFound(account_id)),
                Some(_) if !state.frozen => Err(DomainError::AccountNotFrozen(account_id)),
                Some(_) => Ok(vec![Event::AccountUnfrozen(AccountUnfrozen { account_id, reason })]),
            }
        }
    }
}

/// Applies an event to one account's state. Movements touching other accounts are ignored.
pub fn evolve(mut state: AccountState, event: &Event) -> AccountState {
    match event {
        Event::AccountOpened(e) if state.opened.is_none() => state.opened = Some(e.clone()),
        Event::AccountFrozen(e) if state.opened.as_ref().is_some_and(|a| a.account_id == e.account_id) => {
            state.frozen = true
        }
        Event::AccountUnfrozen(e) if state.opened.as_ref().is_some_and(|a| a.account_id == e.account_id) => {
            state.frozen = false
        }
        Event::TransferRecorded(t) => {
            if let Some(id) = state.id() {
                if t.from_account == id {
                    state.balance -= t.amount;
                }
                if t.to_account == id {
                    state.balance += t.amount;
                }
            }
        }
        Event::HoldPlaced(h) if state.id() == Some(h.from_account) => {
            state.holds.insert(
                h.hold_id,
                Hold {
                    amount: h.amount,
                    to_account: h.to_account,
                    expires_at: h.expires_at,
                    order_id: h.order_id,
                    status: HoldStatus::Pending,
                },
            );
        }
        Event::HoldCaptured(h) => set_hold_status(&mut state, h.hold_id, HoldStatus::Captured),
        Event::HoldReleased(h) => set_hold_status(&mut state, h.hold_id, HoldStatus::Released),
        Event::HoldExpired(h) => set_hold_status(&mut state, h.hold_id, HoldStatus::Expired),
        _ => {}
    }
    state
}

fn set_hold_status(state: &mut AccountState, hold_id: Uuid, status: HoldStatus) {
    if let Some(hold) = state.holds.get_mut(&hold_id) {
        hold.status = status;
    }
}

/// A request to move money, made by `initiated_by`.
#[derive(Clone, Debug)]
pub struct MoveMoney {
    pub transfer_id: Uuid,
    pub kind: TransferKind,
    pub initiated_by: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Amount,
    pub reference: Option<String>,
    /// The fee rule for this kind of movement, if fees are configured for it.
    pub fee: Option<FeeRule>,
}

/// A trimmed, bounded reference.
pub fn check_reference(reference: Option<String>) -> Result<Option<String>, DomainError> {
    let reference = reference.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    if reference.as_ref().is_some_and(|r| r.chars().count() > MAX_REFERENCE_CHARS) {
        return Err(DomainError::validation("reference", format!("must be at most {MAX_REFERENCE_CHARS} characters")));
    }
    Ok(reference)
}

/// The checks every movement between two accounts shares: both exist, are
/// different, share a currency and are not frozen. Returns the currency.
pub fn check_pair(
    from: &AccountState,
    to: &AccountState,
    from_account: Uuid,
    to_account: Uuid,
) -> Result<Currency, DomainError> {
    if from_account == to_account {
        return Err(DomainError::SameAccount);
    }
    let Some(from_currency) = from.currency() else { return Err(DomainError::AccountNotFound(from_account)) };
    let Some(to_currency) = to.currency() else { return Err(DomainError::AccountNotFound(to_account)) };
    if from_currency != to_currency {
        return Err(DomainError::CurrencyMismatch {
            from_account,
            from_currency: from_currency.code().to_owned(),
            to_account,
            to_currency: to_currency.code().to_owned(),
        });
    }
    if from.frozen {
        return Err(DomainError::AccountFrozen(from_account));
    }
    if to.frozen {
        return Err(DomainError::AccountFrozen(to_account));
    }
    Ok(from_currency)
}

/// Refuses a debit of a user account beyond its available funds.
pub fn check_available(
    from: &AccountState,
    from_account: Uuid,
    needed: Decimal,
    currency: Currency,
) -> Result<(), DomainError> {
    if from.kind() == Some(AccountKind::User) && from.available() < needed {
        return Err(DomainError::InsufficientFunds {
            account: from_account,
            available: crate::money::to_minor_units(from.available(), currency),
            requested: needed,
        });
    }
    Ok(())
}

/// Decides a movement against the states of the debit (`from`) and credit (`to`) accounts.
pub fn decide_transfer(from: &AccountState, to: &AccountState, command: MoveMoney) -> Result<Vec<Event>, DomainError> {
    let MoveMoney { transfer_id, kind, initiated_by, from_account, to_account, amount, reference, fee } = command;
    let reference = check_reference(reference)?;
    // The account the caller acts on must be theirs; anything else looks absent.
    match kind {
        TransferKind::Deposit => {
            if !to.is_owned_by(initiated_by) {
                return Err(DomainError::AccountNotFound(to_account));
            }
            if from.kind() != Some(AccountKind::System) {
                return Err(DomainError::AccountNotFound(from_account));
            }
        }
        TransferKind::HoldCapture | TransferKind::Fee => {
            return Err(DomainError::validation("kind", "is not a movement a client can ask for directly"));
        }
        TransferKind::Withdrawal | TransferKind::Transfer | TransferKind::Refund => {
            if !from.is_owned_by(initiated_by) {
                return Err(DomainError::AccountNotFound(from_account));
            }
            if from_account == to_account {
                return Err(DomainError::SameAccount);
            }
            if to.opened.is_none() {
                return Err(DomainError::AccountNotFound(to_account));
            }
            if kind == TransferKind::Withdrawal && to.kind() != Some(AccountKind::System) {
                return Err(DomainError::AccountNotFound(to_account));
            }
        }
    }
    let currency = check_pair(from, to, from_account, to_account)?;
    let amount = amount.in_currency("amount", currency)?;
    // Fees are charged to user accounts only, in the same step as the movement.
    let fee = match (fee, from.kind()) {
        (Some(rule), Some(AccountKind::User)) => rule.fee_for(amount, currency),
        _ => Decimal::ZERO,
    };
    check_available(from, from_account, amount + fee, currency)?;
    let mut events = vec![Event::TransferRecorded(TransferRecorded {
        transfer_id,
        from_account,
        to_account,
        amount,
        currency: currency.code().to_owned(),
        kind,
        reference,
        channel: Channel::Api,
    })];
    if fee > Decimal::ZERO {
        events.push(Event::TransferRecorded(TransferRecorded {
            transfer_id: fee_transfer_id(transfer_id),
            from_account,
            to_account: fee_account_id(currency),
            amount: fee,
            currency: currency.code().to_owned(),
            kind: TransferKind::Fee,
            reference: Some(format!("fee for {transfer_id}")),
            channel: Channel::Api,
        }));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::from_code("USD").unwrap()
    }

    fn given(events: &[Event]) -> AccountState {
        events.iter().fold(AccountState::default(), evolve)
    }

    fn opened(account_id: Uuid, owner: Uuid, currency: &str) -> Event {
        Event::AccountOpened(AccountOpened {
            account_id,
            owner_id: Some(owner),
            currency: currency.into(),
            kind: AccountKind::User,
            name: None,
        })
    }

    fn system(currency: Currency) -> (Uuid, AccountState) {
        let events = decide(&AccountState::default(), AccountCommand::OpenSystem { currency }).unwrap();
        (system_account_id(currency), given(&events))
    }

    fn moved(from: Uuid, to: Uuid, amount: &str, kind: TransferKind) -> Event {
        Event::TransferRecorded(TransferRecorded {
            transfer_id: Uuid::new_v4(),
            from_account: from,
            to_account: to,
            amount: amount.parse().unwrap(),
            currency: "USD".into(),
            kind,
            reference: None,
            channel: Channel::Api,
        })
    }

    fn cmd(kind: TransferKind, by: Uuid, from: Uuid, to: Uuid, amount: &str) -> MoveMoney {
        MoveMoney {
            transfer_id: Uuid::new_v4(),
            kind,
            initiated_by: by,
            from_account: from,
            to_account: to,
            amount: Amount::parse("amount", amount).unwrap(),
            reference: None,
            fee: None,
        }
    }

    #[test]
    fn opening_an_account_records_its_currency_and_owner() {
        let (id, owner) = (Uuid::new_v4(), Uuid::new_v4());
        let events = decide(
            &given(&[]),
            AccountCommand::Open {
                account_id: id,
                owner_id: owner,
                currency: "JPY".into(),
                name: Some(" Travel ".into()),
            },
        )
        .unwrap();
        assert_eq!(
            events,
            vec![Event::AccountOpened(AccountOpened {
                account_id: id,
                owner_id: Some(owner),
                currency: "JPY".into(),
                kind: AccountKind::User,
                name: Some("Travel".into()),
            })]
        );
    }

    #[test]
    fn opening_with_an_unknown_currency_is_a_validation_error() {
        let err = decide(
            &given(&[]),
            AccountCommand::Open {
                account_id: Uuid::new_v4(),
                owner_id: Uuid::new_v4(),
                currency: "XYZ".into(),
                name: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, DomainError::Validation { ref field, .. } if field == "currency"));
    }

    #[test]
    fn opening_twice_is_refused() {
        let (id, owner) = (Uuid::new_v4(), Uuid::new_v4());
        let err = decide(
            &given(&[opened(id, owner, "USD")]),
            AccountCommand::Open { account_id: id, owner_id: owner, currency: "USD".into(), name: None },
        )
        .unwrap_err();
        assert_eq!(err, DomainError::AccountAlreadyOpened(id));
    }

    #[test]
    fn system_accounts_have_stable_ids_per_currency() {
        assert_eq!(system_account_id(usd()), system_account_id(usd()));
        assert_ne!(system_account_id(usd()), system_account_id(Currency::from_code("EUR").unwrap()));
    }

    #[test]
    fn deposit_moves_money_from_the_system_account() {
        let (user, acc) = (Uuid::new_v4(), Uuid::new_v4());
        let (sys, sys_state) = system(usd());
        let to = given(&[opened(acc, user, "USD")]);
        let events = decide_transfer(&sys_state, &to, cmd(TransferKind::Deposit, user, sys, acc, "10.5")).unwrap();
        let [Event::TransferRecorded(t)] = events.as_slice() else { panic!("{events:?}") };
        assert_eq!((t.from_account, t.to_account, t.amount.to_string()), (sys, acc, "10.50".to_string()));
        assert_eq!(evolve(to, &events[0]).balance.to_string(), "10.50");
        assert_eq!(evolve(sys_state, &events[0]).balance.to_string(), "-10.50");
    }

    #[test]
    fn deposit_into_someone_elses_account_looks_absent() {
        let (user, acc) = (Uuid::new_v4(), Uuid::new_v4());
        let (sys, sys_state) = system(usd());
        let to = given(&[opened(acc, user, "USD")]);
        let err =
            decide_transfer(&sys_state, &to, cmd(TransferKind::Deposit, Uuid::new_v4(), sys, acc, "1")).unwrap_err();
        assert_eq!(err, DomainError::AccountNotFound(acc));
    }

    #[test]
    fn withdrawal_beyond_the_balance_is_refused() {
        let (user, acc) = (Uuid::new_v4(), Uuid::new_v4());
        let (sys, sys_state) = system(usd());
        let from = given(&[opened(acc, user, "USD"), moved(sys, acc, "5.00", TransferKind::Deposit)]);
        let err =
            decide_transfer(&from, &sys_state, cmd(TransferKind::Withdrawal, user, acc, sys, "5.01")).unwrap_err();
        assert!(matches!(err, DomainError::InsufficientFunds { account, .. } if account == acc));
        let ok = decide_transfer(&from, &sys_state, cmd(TransferKind::Withdrawal, user, acc, sys, "5")).unwrap();
        assert_eq!(evolve(from, &ok[0]).balance, Decimal::ZERO);
    }

    #[test]
    fn transfer_to_another_users_account_of_the_same_currency() {
        let (ann, bob, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (sys, _) = system(usd());
        let from = given(&[opened(a, ann, "USD"), moved(sys, a, "3.00", TransferKind::Deposit)]);
        let to = given(&[opened(b, bob, "USD")]);
        let events = decide_transfer(&from, &to, cmd(TransferKind::Transfer, ann, a, b, "3.00")).unwrap();
        assert_eq!(evolve(to, &events[0]).balance.to_string(), "3.00");
    }

    #[test]
    fn transfer_rejections() {
        let (ann, bob, a, b, e) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (sys, _) = system(usd());
        let from = given(&[opened(a, ann, "USD"), moved(sys, a, "3.00", TransferKind::Deposit)]);
        let to = given(&[opened(b, bob, "USD")]);
        let eur = given(&[opened(e, bob, "EUR")]);
        let absent = AccountState::default();
        // Debiting someone else's account.
        assert_eq!(
            decide_transfer(&to, &from, cmd(TransferKind::Transfer, ann, b, a, "1")).unwrap_err(),
            DomainError::AccountNotFound(b)
        );
        // Unknown source and destination.
        assert_eq!(
            decide_transfer(&absent, &to, cmd(TransferKind::Transfer, ann, e, b, "1")).unwrap_err(),
            DomainError::AccountNotFound(e)
        );
        assert_eq!(
            decide_transfer(&from, &absent, cmd(TransferKind::Transfer, ann, a, e, "1")).unwrap_err(),
            DomainError::AccountNotFound(e)
        );
        assert_eq!(
            decide_transfer(&from, &from, cmd(TransferKind::Transfer, ann, a, a, "1")).unwrap_err(),
            DomainError::SameAccount
        );
        assert!(matches!(
            decide_transfer(&from, &eur, cmd(TransferKind::Transfer, ann, a, e, "1")).unwrap_err(),
            DomainError::CurrencyMismatch { .. }
        ));
        assert!(matches!(
            decide_transfer(&from, &to, cmd(TransferKind::Transfer, ann, a, b, "3.01")).unwrap_err(),
            DomainError::InsufficientFunds { .. }
        ));
        assert!(
            matches!(decide_transfer(&from, &to, cmd(TransferKind::Transfer, ann, a, b, "0.001")).unwrap_err(), DomainError::Validation { ref field, .. } if field == "amount")
        );
        let mut long = cmd(TransferKind::Transfer, ann, a, b, "1");
        long.reference = Some("x".repeat(MAX_REFERENCE_CHARS + 1));
        assert!(
            matches!(decide_transfer(&from, &to, long).unwrap_err(), DomainError::Validation { ref field, .. } if field == "reference")
        );
    }

    #[test]
    fn system_accounts_may_go_negative_user_accounts_may_not() {
        let (user, acc) = (Uuid::new_v4(), Uuid::new_v4());
        let (sys, sys_state) = system(usd());
        assert!(sys_state.balance.is_zero());
        let to = given(&[opened(acc, user, "USD")]);
        assert!(decide_transfer(&sys_state, &to, cmd(TransferKind::Deposit, user, sys, acc, "100")).is_ok());
        assert!(decide_transfer(&to, &sys_state, cmd(TransferKind::Withdrawal, user, acc, sys, "0.01")).is_err());
    }

    #[test]
    fn a_frozen_account_refuses_debits_and_credits_until_unfrozen() {
        let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let funded = Event::TransferRecorded(TransferRecorded {
            transfer_id: Uuid::new_v4(),
            from_account: system_account_id(usd()),
            to_account: a,
            amount: Decimal::new(1000, 2),
            currency: "USD".into(),
            kind: TransferKind::Deposit,
            reference: None,
            channel: Channel::Api,
        });
        let freeze = decide(
            &given(&[opened(a, ann, "USD")]),
            AccountCommand::Freeze { account_id: a, reason: " fraud check ".into() },
        )
        .unwrap();
        assert_eq!(freeze, vec![Event::AccountFrozen(AccountFrozen { account_id: a, reason: "fraud check".into() })]);
        let frozen = given(&[opened(a, ann, "USD"), funded.clone(), freeze[0].clone()]);
        let other = given(&[opened(b, bob, "USD")]);
        let pay = |from: &AccountState, to: &AccountState, by, from_account, to_account| {
            decide_transfer(
                from,
                to,
                MoveMoney {
                    transfer_id: Uuid::new_v4(),
                    kind: TransferKind::Transfer,
                    initiated_by: by,
                    from_account,
                    to_account,
                    amount: Amount::parse("amount", "1.00").unwrap(),
                    reference: None,
                    fee: None,
                },
            )
        };
        assert_eq!(pay(&frozen, &other, ann, a, b), Err(DomainError::AccountFrozen(a)));
        assert_eq!(pay(&other, &frozen, bob, b, a).unwrap_err(), DomainError::AccountFrozen(a));
        assert_eq!(
            decide(&frozen, AccountCommand::Freeze { account_id: a, reason: "again".into() }),
            Err(DomainError::AccountAlreadyFrozen(a))
        );
        let unfreeze = decide(&frozen, AccountCommand::Unfreeze { account_id: a, reason: "cleared".into() }).unwrap();
        let thawed = given(&[opened(a, ann, "USD"), funded, freeze[0].clone(), unfreeze[0].clone()]);
        assert!(pay(&thawed, &other, ann, a, b).is_ok());
        assert_eq!(
            decide(&thawed, AccountCommand::Unfreeze { account_id: a, reason: "x".into() }),
            Err(DomainError::AccountNotFrozen(a))
        );
    }

    #[test]
    fn freezing_needs_a_reason_and_a_user_account() {
        let a = Uuid::new_v4();
        let state = given(&[opened(a, Uuid::new_v4(), "USD")]);
        let err = decide(&state, AccountCommand::Freeze { account_id: a, reason: "  ".into() }).unwrap_err();
        assert_eq!(err, DomainError::validation("reason", "is required"));
        assert_eq!(
            decide(&AccountState::default(), AccountCommand::Freeze { account_id: a, reason: "r".into() }),
            Err(DomainError::AccountNotFound(a))
        );
        let system = given(&decide(&AccountState::default(), AccountCommand::OpenSystem { currency: usd() }).unwrap());
        let id = system_account_id(usd());
        assert!(matches!(
            decide(&system, AccountCommand::Freeze { account_id: id, reason: "r".into() }),
            Err(DomainError::Validation { .. })
        ));
    }
}
