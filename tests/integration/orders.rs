//! The shop flow: orders paid from balances by the payment process, cancels,
//! refunds, and redelivery of the process's messages.

use crate::harness::{FundedPair, TestLedger};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use ledger_domain::events::Role;
use ledger_projections::processes::PaymentProcess;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

fn code(v: &Value) -> &str {
    v["type"].as_str().and_then(|t| t.rsplit('/').next()).unwrap_or("")
}

/// Polls an order until it leaves NEW (the payment process is asynchronous).
async fn settled_order(t: &TestLedger, token: &str, order_id: &str, want: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (s, v) = t.get(&format!("/v1/orders/{order_id}"), token).await;
        if s == StatusCode::OK && v["status"] == want {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("order {order_id} never reached {want}: {last}");
}

#[tokio::test]
async fn an_order_is_paid_finished_and_refunded_within_what_was_captured() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, merchant) = t.user().await;
    let admin = t.person_with_role(Role::Admin).await;
    let a = t.account(&ann, "EUR").await;
    let shop = t.account(&merchant, "EUR").await;
    t.deposit(&ann, &a, "100.00").await;

    let (s, created) = t
        .post(
            "/v1/orders",
            &ann,
            json!({"account_id": a, "merchant_account": shop, "amount": "30.00", "description": "kettle"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "NEW");
    let order_id = created["order_id"].as_str().unwrap().to_owned();
    let order = settled_order(&t, &ann, &order_id, "FINISHED").await;
    let steps: Vec<&str> =
        order["history"].as_array().unwrap().iter().map(|h| h["event_type"].as_str().unwrap()).collect();
    assert_eq!(steps, ["OrderPlaced", "OrderPaymentHeld", "OrderFinished"]);
    assert_eq!(order["captured"], "30.00");
    let channels: Vec<(String, String)> = sqlx::query_as(
        "SELECT payload->>'kind', payload->>'channel' FROM events WHERE event_type = 'TransferRecorded' ORDER BY position",
    )
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(
        channels,
        [("deposit".to_owned(), "api".to_owned()), ("hold_capture".to_owned(), "system".to_owned())],
        "the auto-accepted capture is the system's, the deposit a client's"
    );
    let (s, _) = t.get(&format!("/v1/orders/{order_id}"), &merchant).await;
    assert_eq!(s, StatusCode::OK, "the merchant sees it too");
    let (_, eve) = t.user().await;
    let (s, v) = t.get(&format!("/v1/orders/{order_id}"), &eve).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "order-not-found"));

    // Refunds: the merchant, within the captured amount; a repeated key moves nothing.
    let refund = format!("/v1/orders/{order_id}/refunds");
    let (s, v) = t.post(&refund, &ann, json!({"amount": "1.00"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "order-not-found"), "the customer cannot refund: {v}");
    let (s1, v1, _) =
        t.request(Method::POST, &refund, Some(&merchant), Some("refund-1"), Some(json!({"amount": "20.00"}))).await;
    let (s2, v2, h2) =
        t.request(Method::POST, &refund, Some(&merchant), Some("refund-1"), Some(json!({"amount": "20.00"}))).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED), "{v1}");
    assert_eq!(v1, v2);
    assert_eq!(h2["idempotent-replayed"], "true");
    let (s, v) = t.post(&refund, &merchant, json!({"amount": "10.01"})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "refund-exceeds-captured"), "{v}");
    let (s, v) = t.post(&refund, &admin.token, json!({"amount": "10.00"})).await;
    assert_eq!(s, StatusCode::CREATED, "an admin may refund: {v}");

    let head = t.head().await;
    let (_, a_view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    let (_, shop_view) = t.get(&format!("/v1/accounts/{shop}?min_position={head}"), &merchant).await;
    assert_eq!((a_view["balance"].as_str(), shop_view["balance"].as_str()), (Some("100.00"), Some("0.00")));
    let (_, order) = t.get(&format!("/v1/orders/{order_id}?min_position={head}"), &ann).await;
    assert_eq!(order["refunded"], "30.00");
    let (_, mine) = t.get("/v1/orders?status=FINISHED", &ann).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    let (_, sold) = t.get("/v1/orders?role=merchant", &merchant).await;
    assert_eq!(sold["items"].as_array().unwrap().len(), 1, "a merchant lists their shop's orders");
    let (_, none) = t.get("/v1/orders", &merchant).await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0, "and buys nothing");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn an_order_the_customer_cannot_afford_is_cancelled() {
    let t = TestLedger::start().await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: shop } = t.funded_pair("USD", "5.00").await;
    let (_, created) = t
        .post(
            "/v1/orders",
            &ann,
            json!({"account_id": a, "merchant_account": shop, "amount": "30.00", "description": "tv"}),
        )
        .await;
    let order = settled_order(&t, &ann, created["order_id"].as_str().unwrap(), "CANCELLED").await;
    assert_eq!(order["cancel_reason"], "insufficient-funds");
    let (s, v) = t
        .post(
            "/v1/orders",
            &ann,
            json!({"account_id": shop, "merchant_account": a, "amount": "1.00", "description": "x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "account-not-found"), "pay only from your own account: {v}");
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn the_customer_cancels_a_new_order_and_its_hold_is_released() {
    let t = TestLedger::start_with(|c| c.order_auto_accept = false).await;
    let FundedPair { payer: ann, payer_account: a, payee: merchant, payee_account: shop } =
        t.funded_pair("USD", "50.00").await;
    let (_, created) = t
        .post(
            "/v1/orders",
            &ann,
            json!({"account_id": a, "merchant_account": shop, "amount": "20.00", "description": "x"}),
        )
        .await;
    let order_id = created["order_id"].as_str().unwrap().to_owned();
    // Wait for the hold (NEW, with a hold id).
    let mut held = Value::Null;
    for _ in 0..100 {
        let (_, v) = t.get(&format!("/v1/orders/{order_id}"), &ann).await;
        if v["hold_id"].is_string() {
            held = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held["status"], "NEW", "{held}");
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["available"], "30.00");
    // An order's hold is not captured or released directly.
    let hold_id = held["hold_id"].as_str().unwrap();
    let (s, v) = t.post(&format!("/v1/holds/{hold_id}/capture"), &merchant, json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "validation"), "{v}");
    let (s, v) = t.post(&format!("/v1/orders/{order_id}/cancel"), &merchant, json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "order-not-found"), "only the customer cancels: {v}");
    let (s, v) = t.post(&format!("/v1/orders/{order_id}/cancel"), &ann, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.post(&format!("/v1/orders/{order_id}/accept"), &merchant, json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "order-state-conflict"), "a cancelled order is not captured: {v}");
    let head = t.head().await;
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={head}"), &ann).await;
    assert_eq!((view["balance"].as_str(), view["available"].as_str()), (Some("50.00"), Some("50.00")));
    let (_, order) = t.get(&format!("/v1/orders/{order_id}?min_position={head}"), &ann).await;
    assert_eq!(
        (order["status"].as_str(), order["cancel_reason"].as_str()),
        (Some("CANCELLED"), Some("customer-cancelled"))
    );
    t.assert_invariants().await;
    t.cleanup().await;
}

#[tokio::test]
async fn redelivered_payment_messages_charge_once() {
    // No payment process in the service: this test plays it, and redelivers.
    let t = TestLedger::start_with(|c| c.order_auto_accept = true).await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: shop } =
        t.funded_pair("USD", "100.00").await;
    let (_, created) = t
        .post(
            "/v1/orders",
            &ann,
            json!({"account_id": a, "merchant_account": shop, "amount": "40.00", "description": "x"}),
        )
        .await;
    let order_id = created["order_id"].as_str().unwrap().to_owned();
    settled_order(&t, &ann, &order_id, "FINISHED").await;

    // Read the process's two triggering messages back from JetStream and deliver
    // them again, several times and concurrently, as after a crash before the ack.
    let client = async_nats::connect(&t.config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let names = ledger_commands::nats::NatsNames::new(&t.config.nats_prefix);
    let stream = js.get_stream(names.stream()).await.unwrap();
    // The whole stream, filtered here: several filter subjects need NATS 2.10.
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(1000).expires(Duration::from_secs(2)).messages().await.unwrap();
    let triggers = [names.subject("OrderPlaced"), names.subject("OrderPaymentHeld")];
    let mut payloads = vec![];
    while let Some(m) = messages.next().await {
        let m = m.unwrap();
        if triggers.iter().any(|t| m.subject.as_str() == t) {
            payloads.push(m.payload.clone());
        }
    }
    assert_eq!(payloads.len(), 2, "one OrderPlaced and one OrderPaymentHeld");
    let process =
        PaymentProcess { ledger: ledger::ledger_for(&t.config, t.pool.clone()), js, names, auto_accept: true };
    for _ in 0..3 {
        let deliveries = payloads.iter().map(|p| process.handle(p));
        for result in futures::future::join_all(deliveries).await {
            result.expect("a redelivery is handled");
        }
    }
    let count = |event_type: &'static str| {
        let pool = t.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = $1")
                .bind(event_type)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("HoldPlaced").await, 1);
    assert_eq!(count("HoldCaptured").await, 1);
    assert_eq!(count("OrderFinished").await, 1);
    let (_, view) = t.get(&format!("/v1/accounts/{a}?min_position={}", t.head().await), &ann).await;
    assert_eq!(view["balance"], "60.00", "charged once");
    t.assert_invariants().await;
    t.cleanup().await;
}

/// The payment process follows one consumer per triggering event type, each
/// filtered by one subject: nothing else reaches it (several `filter_subjects`
/// in one consumer need NATS 2.10; a 2.9 server delivered it every event).
/// It takes over from the former single `payments` consumer after what that
/// one had acknowledged, and removes it.
#[tokio::test]
async fn the_payment_process_gets_only_order_events_and_takes_over_from_the_former_consumer() {
    use ledger::config::Roles;
    let no_process = Roles { command_api: true, query_api: true, relay: true, projectors: true, processes: false };
    let t = TestLedger::start_with_roles(|_| {}, no_process).await;
    let FundedPair { payer: ann, payer_account: a, payee: _, payee_account: shop } =
        t.funded_pair("EUR", "100.00").await;
    let place = |amount: &str| {
        t.post(
            "/v1/orders",
            &ann,
            json!({"account_id": a, "merchant_account": shop, "amount": amount, "description": "x"}),
        )
    };
    let (s, first) = place("10.00").await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    t.settle().await;

    // The former consumer, which had handled (acknowledged) all of that.
    let client = async_nats::connect(&t.config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let names = ledger_commands::nats::NatsNames::new(&t.config.nats_prefix);
    let stream = js.get_stream(names.stream()).await.unwrap();
    let former_name = names.consumer("payments");
    let former = stream
        .create_consumer(pull::Config {
            durable_name: Some(former_name.clone()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = former.fetch().max_messages(1000).expires(Duration::from_secs(1)).messages().await.unwrap();
    while let Some(m) = messages.next().await {
        m.unwrap().double_ack().await.unwrap();
    }

    // A later order, then an instance running the payment process.
    let (s, second) = place("20.00").await;
    assert_eq!(s, StatusCode::CREATED, "{second}");
    let process_only = Roles { command_api: false, query_api: false, relay: false, projectors: false, processes: true };
    let process = ledger::start(t.config.clone(), process_only).await.expect("process starts");
    settled_order(&t, &ann, second["order_id"].as_str().unwrap(), "FINISHED").await;
    t.settle().await;

    // The first order was the former consumer's: left as it was.
    let (_, v) = t.get(&format!("/v1/orders/{}", first["order_id"].as_str().unwrap()), &ann).await;
    assert_eq!(v["status"], "NEW", "{v}");
    for (consumer, delivered) in [("payments-placed", 1), ("payments-held", 1)] {
        let info = stream.consumer_info(names.consumer(consumer)).await.expect("the successor exists");
        assert_eq!(info.delivered.consumer_sequence, delivered, "{consumer}: only its own event type");
    }
    assert!(stream.consumer_info(&former_name).await.is_err(), "the former consumer is removed");
    process.stop().await;
    t.cleanup().await;
}
