//! `GET /v1/live`: a socket receives the user's own events as they happen,
//! catches up after a reconnect, and sees nothing of other users.

use crate::harness::TestLedger;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(t: &TestLedger, token: &str, query: &str) -> Socket {
    let url = format!("{}/v1/live{query}", t.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("socket opens");
    socket
}

/// The next message of a type, within a deadline.
async fn next_of(socket: &mut Socket, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = tokio::time::timeout(remaining, socket.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} message in time"))
            .expect("socket open")
            .expect("message");
        if let Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            if v["type"] == kind {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn a_socket_receives_an_incoming_transfer_and_catches_up_after_reconnecting() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let (_, eve) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let b = t.account(&bob, "USD").await;
    t.deposit(&bob, &b, "20.00").await;

    let mut ann_socket = connect(&t, &ann, "").await;
    let mut eve_socket = connect(&t, &eve, "").await;
    // The feed's consumer starts from "now": give the socket registration a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, sent) = t.post("/v1/transfers", &bob, json!({"from_account": b, "to_account": a, "amount": "7.50"})).await;
    let message = next_of(&mut ann_socket, "TransferRecorded").await;
    assert_eq!(message["data"]["to_account"], a.as_str());
    assert_eq!(message["data"]["amount"], "7.50");
    assert_eq!(message["position"], sent["position"]);
    // Eve is told nothing about it.
    let quiet = tokio::time::timeout(Duration::from_millis(500), eve_socket.next()).await;
    assert!(quiet.is_err(), "another user's socket stays quiet: {quiet:?}");

    // Reconnecting after a position replays what came since.
    let since = sent["position"].as_i64().unwrap();
    let (_, later) = t.post("/v1/transfers", &bob, json!({"from_account": b, "to_account": a, "amount": "1.25"})).await;
    drop(ann_socket);
    let mut again = connect(&t, &ann, &format!("?after_position={since}")).await;
    let missed = next_of(&mut again, "TransferRecorded").await;
    assert_eq!(missed["position"], later["position"]);
    assert_eq!(missed["data"]["amount"], "1.25");

    // Without credentials there is no socket.
    let url = format!("{}/v1/live", t.base.replace("http://", "ws://"));
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    t.cleanup().await;
}

#[tokio::test]
async fn a_reconnect_too_far_back_is_told_to_resync() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    // A position that does not exist cannot be replayed from.
    let mut socket = connect(&t, &ann, "?after_position=999999").await;
    let message = next_of(&mut socket, "resync").await;
    assert_eq!(message["type"], "resync");
    t.cleanup().await;
}

#[tokio::test]
async fn a_socket_closes_when_its_session_ends() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let mut socket = connect(&t, &ann, "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = t.post_plain("/v1/auth/logout-all", &ann, json!({})).await;
    assert_eq!(s, reqwest::StatusCode::OK);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the socket was closed after logout-all");
    t.cleanup().await;
}

#[tokio::test]
async fn the_feed_follows_the_stream_only_while_a_socket_is_connected() {
    let t = TestLedger::start().await;
    let (_, ann) = t.user().await;
    let (_, bob) = t.user().await;
    let a = t.account(&ann, "USD").await;
    let b = t.account(&bob, "USD").await;
    t.deposit(&bob, &b, "20.00").await;
    t.settle().await;
    let js = async_nats::jetstream::new(async_nats::connect(&t.config.nats_url).await.expect("NATS"));
    let names = ledger_commands::nats::NatsNames::new(&t.config.nats_prefix);
    // The durable consumers (read side, payment process) are named after
    // the prefix; the live feed's is ephemeral, named by the server.
    let ephemeral = || async {
        let stream = js.get_stream(names.stream()).await.expect("the stream");
        let all: Vec<String> =
            stream.consumer_names().collect::<Vec<_>>().await.into_iter().map(|n| n.expect("name")).collect();
        all.into_iter().filter(|n| !n.starts_with(&t.config.nats_prefix)).count()
    };
    assert_eq!(ephemeral().await, 0, "events flowed, but with no socket the feed does not follow them");

    let mut socket = connect(&t, &ann, "").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ephemeral().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first socket starts the feed's consumer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ephemeral().await, 1, "one consumer for this instance's sockets");
    // Its socket is served from the moment it follows.
    let (_, sent) = t.post("/v1/transfers", &bob, json!({"from_account": b, "to_account": a, "amount": "2.00"})).await;
    let message = next_of(&mut socket, "TransferRecorded").await;
    assert_eq!(message["position"], sent["position"]);
    t.cleanup().await;
}
