//! Orders paid from balances: NEW, then FINISHED (the hold captured) or
//! CANCELLED (funds short, the customer cancelled, the hold expired). Refunds
//! of a finished order never exceed what was captured.

use crate::account::{check_pair, AccountState};
use crate::events::{CancelReason, Event, OrderCancelled, OrderFinished, OrderPaymentHeld, OrderPlaced, OrderRefunded};
use crate::money::Amount;
use crate::DomainError;
use rust_decimal::Decimal;
use uuid::Uuid;

pub const MAX_DESCRIPTION_CHARS: usize = 500;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrderStatus {
    #[default]
    New,
    Finished,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::New => "NEW",
            OrderStatus::Finished => "FINISHED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderState {
    pub placed: Option<OrderPlaced>,
    pub status: OrderStatus,
    pub hold_id: Option<Uuid>,
    pub captured: Decimal,
    pub refunded: Decimal,
}

pub fn evolve(mut state: OrderState, event: &Event) -> OrderState {
    match event {
        Event::OrderPlaced(e) => state.placed = Some(e.clone()),
        Event::OrderPaymentHeld(e) => state.hold_id = Some(e.hold_id),
        Event::OrderFinished(e) => {
            state.status = OrderStatus::Finished;
            state.captured = e.amount;
        }
        Event::OrderCancelled(_) => state.status = OrderStatus::Cancelled,
        Event::OrderRefunded(e) => state.refunded += e.amount,
        _ => {}
    }
    state
}

#[derive(Clone, Debug)]
pub struct PlaceOrder {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub account_id: Uuid,
    pub merchant_account: Uuid,
    pub amount: Amount,
    pub description: String,
}

/// The customer's account must be theirs; the merchant's any open account of the same currency.
pub fn decide_place(
    account: &AccountState,
    merchant: &AccountState,
    command: PlaceOrder,
) -> Result<Vec<Event>, DomainError> {
    let PlaceOrder { order_id, customer_id, account_id, merchant_account, amount, description } = command;
    let description = description.trim().to_owned();
    if description.is_empty() || description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(DomainError::validation("description", format!("must be 1 to {MAX_DESCRIPTION_CHARS} characters")));
    }
    if !account.is_owned_by(customer_id) {
        return Err(DomainError::AccountNotFound(account_id));
    }
    // Shops are users' accounts; a system account has nobody to accept or refund.
    if merchant.kind() != Some(crate::events::AccountKind::User) {
        return Err(DomainError::AccountNotFound(merchant_account));
    }
    let currency = check_pair(account, merchant, account_id, merchant_account)?;
    let amount = amount.in_currency("amount", currency)?;
    Ok(vec![Event::OrderPlaced(OrderPlaced {
        order_id,
        customer_id,
        account_id,
        merchant_account,
        amount,
        currency: currency.code().to_owned(),
        description,
    })])
}

fn placed(state: &OrderState, order_id: Uuid) -> Result<&OrderPlaced, DomainError> {
    state.placed.as_ref().ok_or(DomainError::OrderNotFound(order_id))
}

fn must_be_new(state: &OrderState, order_id: Uuid) -> Result<(), DomainError> {
    placed(state, order_id)?;
    if state.status != OrderStatus::New {
        return Err(DomainError::OrderNotInStatus(order_id, "NEW"));
    }
    Ok(())
}

pub fn decide_payment_held(state: &OrderState, order_id: Uuid, hold_id: Uuid) -> Result<Vec<Event>, DomainError> {
    must_be_new(state, order_id)?;
    if state.hold_id.is_some() {
        return Err(DomainError::OrderNotInStatus(order_id, "awaiting payment"));
    }
    Ok(vec![Event::OrderPaymentHeld(OrderPaymentHeld { order_id, hold_id })])
}

pub fn decide_finish(
    state: &OrderState,
    order_id: Uuid,
    transfer_id: Uuid,
    amount: Decimal,
) -> Result<Vec<Event>, DomainError> {
    must_be_new(state, order_id)?;
    if state.hold_id.is_none() {
        return Err(DomainError::OrderNotInStatus(order_id, "paid for"));
    }
    Ok(vec![Event::OrderFinished(OrderFinished { order_id, transfer_id, amount })])
}

pub fn decide_cancel(state: &OrderState, order_id: Uuid, reason: CancelReason) -> Result<Vec<Event>, DomainError> {
    must_be_new(state, order_id)?;
    Ok(vec![Event::OrderCancelled(OrderCancelled { order_id, reason })])
}

pub fn decide_refund(
    state: &OrderState,
    order_id: Uuid,
    transfer_id: Uuid,
    amount: Decimal,
) -> Result<Vec<Event>, DomainError> {
    placed(state, order_id)?;
    if state.status != OrderStatus::Finished {
        return Err(DomainError::OrderNotInStatus(order_id, "FINISHED"));
    }
    if state.refunded + amount > state.captured {
        return Err(DomainError::RefundExceedsCaptured {
            captured: state.captured,
            refunded: state.refunded,
            requested: amount,
        });
    }
    Ok(vec![Event::OrderRefunded(OrderRefunded { order_id, transfer_id, amount })])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AccountKind, AccountOpened};

    fn account(id: Uuid, owner: Uuid) -> AccountState {
        crate::account::evolve(
            AccountState::default(),
            &Event::AccountOpened(AccountOpened {
                account_id: id,
                owner_id: Some(owner),
                currency: "EUR".into(),
                kind: AccountKind::User,
                name: None,
            }),
        )
    }

    fn given(events: &[Event]) -> OrderState {
        events.iter().fold(OrderState::default(), evolve)
    }

    fn new_order() -> (Uuid, Vec<Event>) {
        let (ann, shop_owner, a, shop, order_id) =
            (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let events = decide_place(
            &account(a, ann),
            &account(shop, shop_owner),
            PlaceOrder {
                order_id,
                customer_id: ann,
                account_id: a,
                merchant_account: shop,
                amount: Amount::parse("amount", "30.00").unwrap(),
                description: " a kettle ".into(),
            },
        )
        .unwrap();
        (order_id, events)
    }

    #[test]
    fn an_order_goes_new_paid_finished_then_refunds_up_to_the_captured_amount() {
        let (id, mut history) = new_order();
        let Event::OrderPlaced(p) = &history[0] else { panic!() };
        assert_eq!(p.description, "a kettle");
        assert!(decide_finish(&given(&history), id, Uuid::new_v4(), Decimal::new(3000, 2)).is_err(), "not paid yet");
        history.extend(decide_payment_held(&given(&history), id, Uuid::new_v4()).unwrap());
        assert!(decide_payment_held(&given(&history), id, Uuid::new_v4()).is_err(), "one hold per order");
        history.extend(decide_finish(&given(&history), id, Uuid::new_v4(), Decimal::new(3000, 2)).unwrap());
        assert_eq!(given(&history).status, OrderStatus::Finished);
        assert!(decide_cancel(&given(&history), id, CancelReason::CustomerCancelled).is_err());
        history.extend(decide_refund(&given(&history), id, Uuid::new_v4(), Decimal::new(2000, 2)).unwrap());
        assert_eq!(
            decide_refund(&given(&history), id, Uuid::new_v4(), Decimal::new(1001, 2)),
            Err(DomainError::RefundExceedsCaptured {
                captured: Decimal::new(3000, 2),
                refunded: Decimal::new(2000, 2),
                requested: Decimal::new(1001, 2)
            })
        );
        assert!(decide_refund(&given(&history), id, Uuid::new_v4(), Decimal::new(1000, 2)).is_ok());
    }

    #[test]
    fn only_a_new_order_is_cancelled_and_a_cancelled_one_is_never_paid() {
        let (id, mut history) = new_order();
        history.extend(decide_cancel(&given(&history), id, CancelReason::CustomerCancelled).unwrap());
        assert_eq!(given(&history).status, OrderStatus::Cancelled);
        assert!(decide_cancel(&given(&history), id, CancelReason::HoldExpired).is_err());
        assert!(decide_payment_held(&given(&history), id, Uuid::new_v4()).is_err());
        assert!(decide_refund(&given(&history), id, Uuid::new_v4(), Decimal::ONE).is_err());
    }

    #[test]
    fn a_customer_pays_only_from_their_own_account() {
        let (a, shop) = (Uuid::new_v4(), Uuid::new_v4());
        let err = decide_place(
            &account(a, Uuid::new_v4()),
            &account(shop, Uuid::new_v4()),
            PlaceOrder {
                order_id: Uuid::new_v4(),
                customer_id: Uuid::new_v4(),
                account_id: a,
                merchant_account: shop,
                amount: Amount::parse("amount", "1").unwrap(),
                description: "x".into(),
            },
        );
        assert_eq!(err, Err(DomainError::AccountNotFound(a)));
    }
}
