//! Live updates over WebSocket: `GET /v1/live`.
//!
//! Every instance with sockets connected follows the JetStream stream with an
//! ephemeral consumer of its own and forwards each money event (movements,
//! holds, orders, freezes) to the sockets of the users it concerns that are
//! connected to *this* instance; several instances behind a balancer each
//! serve their own sockets. An instance without sockets does not follow
//! (NATS would deliver it every event for nobody); the first socket starts
//! the consumer and waits for it before its replay, so nothing falls
//! between the two, and the consumer stops when two checks `LINGER` apart
//! found no socket. A reconnecting client sends `?after_position=N` and
//! first gets what it missed from the log, or `{"type":"resync"}` when that
//! is more than
//! `REPLAY_LIMIT` events back. The sockets connected also get a resync when
//! the feed follows again after an interruption (its new consumer starts at
//! new events). Each socket has a bounded queue: a client that
//! falls behind is disconnected, never buffered without bound.

use crate::auth::{AuthUser, Credential};
use crate::extract::QueryParams;
use crate::problem::Problem;
use crate::state::AppState;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::StreamExt;
use ledger_commands::identity::CredentialCheck;
use ledger_commands::nats::{ensure_stream, NatsNames};
use ledger_commands::store::{self, LogPoint, RecordedEvent};
use ledger_domain::Event;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;
use uuid::Uuid;

/// Messages a socket may have queued before it counts as too slow.
pub const QUEUE: usize = 256;
/// How far back a reconnect is replayed; beyond it the client must resync.
pub const REPLAY_LIMIT: i64 = 1_000;
/// Accounts whose owner is remembered before the memory is cleared.
const OWNER_CACHE: usize = 100_000;
/// A send that takes longer means the client stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a socket's session or API key is checked again.
const RECHECK: Duration = Duration::from_secs(15);
/// Queued (never sent) to make a socket check its credential now.
const RECHECK_NOW: &str = "\u{0}recheck";
/// The feed stops after two checks this far apart found no socket (30–60 s
/// after the last one left, as a rule: a reconnecting client finds it running).
const LINGER: Duration = Duration::from_secs(30);
/// How long a new socket waits for the feed to follow the stream before it
/// goes on without (NATS down: it gets its replay, and live events once the
/// feed is back).
const FEED_READY_WAIT: Duration = Duration::from_secs(5);

type Clients = HashMap<Uuid, Vec<(u64, mpsc::Sender<String>)>>;

/// The sockets connected to this instance, by user, and who owns which account.
pub struct LiveHub {
    pool: PgPool,
    clients: Mutex<Clients>,
    owners: Mutex<HashMap<Uuid, Option<Uuid>>>,
    next_id: AtomicU64,
    /// Whether the feed's consumer follows the stream now. Only changed to
    /// `false` under the `clients` lock, after seeing no socket: a socket
    /// registered before that keeps the feed going; one registered after
    /// sees `false` and waits for the restart.
    following: tokio::sync::watch::Sender<bool>,
    /// Wakes the feed when a socket registers.
    wanted: tokio::sync::Notify,
}

impl LiveHub {
    pub fn new(pool: PgPool) -> LiveHub {
        LiveHub {
            pool,
            clients: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            following: tokio::sync::watch::Sender::new(false),
            wanted: tokio::sync::Notify::new(),
        }
    }

    /// Stops following if no socket is connected; says whether it stopped.
    fn stop_following_if_unused(&self) -> bool {
        let clients = self.clients();
        if clients.values().all(Vec::is_empty) {
            self.following.send_replace(false);
            return true;
        }
        false
    }

    /// Waits (a bounded time) until the feed follows the stream; says
    /// whether it does.
    async fn feed_ready(&self) -> bool {
        self.wanted.notify_one();
        let mut following = self.following.subscribe();
        let ready = tokio::time::timeout(FEED_READY_WAIT, following.wait_for(|f| *f)).await;
        matches!(ready, Ok(Ok(_)))
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Clients> {
        // A poisoned lock only means a panic mid-update of this map; it stays usable.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, user: Uuid) -> (u64, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.clients().entry(user).or_default().push((id, tx));
        (id, rx)
    }

    fn unregister(&self, user: Uuid, id: u64) {
        let mut clients = self.clients();
        if let Some(list) = clients.get_mut(&user) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                clients.remove(&user);
            }
        }
    }

    pub fn connected(&self) -> usize {
        self.clients().values().map(Vec::len).sum()
    }

    /// Tells every connected socket to resync: the feed follows again after
    /// an error, from new events only, so what came in between would
    /// otherwise be missed without a word.
    fn resync_all(&self) {
        let users: Vec<Uuid> = self.clients().keys().copied().collect();
        let text = json!({ "type": "resync" }).to_string();
        for user in users {
            self.send(user, &text);
        }
    }

    /// Queues a message for every socket of `user`; a full queue drops that socket.
    fn send(&self, user: Uuid, text: &str) {
        let mut clients = self.clients();
        if let Some(list) = clients.get_mut(&user) {
            list.retain(|(_, tx)| match tx.try_send(text.to_owned()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::info!(%user, "live client too slow; disconnecting it");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if list.is_empty() {
                clients.remove(&user);
            }
        }
    }

    async fn owner(&self, account: Uuid) -> Option<Uuid> {
        if let Some(known) = self.owners.lock().unwrap_or_else(|p| p.into_inner()).get(&account) {
            return *known;
        }
        // From the log: an account's owner never changes, and the read models may lag.
        let found: Result<Option<Option<String>>, sqlx::Error> =
            sqlx::query_scalar("SELECT payload->>'owner_id' FROM events WHERE stream_id = $1 AND stream_version = 1")
                .bind(format!("account-{account}"))
                .fetch_optional(&self.pool)
                .await;
        // Only an answer is remembered; an error is tried again next time.
        let Ok(Some(owner)) = found else { return None };
        let owner = owner.and_then(|o| Uuid::parse_str(&o).ok());
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if owners.len() > OWNER_CACHE {
            owners.clear();
        }
        owners.insert(account, owner);
        owner
    }

    /// The payee's account of a hold, from its placement in the log.
    async fn hold_payee(&self, hold_id: Uuid) -> Option<Uuid> {
        let to: Option<String> = sqlx::query_scalar(
            "SELECT payload->>'to_account' FROM events WHERE event_type = 'HoldPlaced' AND payload->>'hold_id' = $1",
        )
        .bind(hold_id.to_string())
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten();
        to.and_then(|t| Uuid::parse_str(&t).ok())
    }

    /// The users an event concerns, if it is one the live feed carries.
    async fn audience(&self, event: &Event) -> Vec<Uuid> {
        let (accounts, users): (Vec<Uuid>, Vec<Uuid>) = match event {
            Event::TransferRecorded(t) => (vec![t.from_account, t.to_account], vec![]),
            Event::HoldPlaced(h) => (vec![h.from_account, h.to_account], vec![]),
            Event::HoldCaptured(h) => (vec![h.from_account, h.to_account], vec![]),
            Event::HoldReleased(h) => {
                (std::iter::once(h.from_account).chain(self.hold_payee(h.hold_id).await).collect(), vec![])
            }
            Event::HoldExpired(h) => {
                (std::iter::once(h.from_account).chain(self.hold_payee(h.hold_id).await).collect(), vec![])
            }
            Event::AccountFrozen(a) => (vec![a.account_id], vec![]),
            Event::AccountUnfrozen(a) => (vec![a.account_id], vec![]),
            Event::OrderPlaced(o) => (vec![o.merchant_account], vec![o.customer_id]),
            Event::OrderPaymentHeld(_)
            | Event::OrderFinished(_)
            | Event::OrderCancelled(_)
            | Event::OrderRefunded(_) => {
                return self.order_audience(event).await;
            }
            _ => return vec![],
        };
        let mut audience = users;
        for account in accounts {
            if let Some(owner) = self.owner(account).await {
                audience.push(owner);
            }
        }
        audience.sort();
        audience.dedup();
        audience
    }

    async fn order_audience(&self, event: &Event) -> Vec<Uuid> {
        let order_id = match event {
            Event::OrderPaymentHeld(o) => o.order_id,
            Event::OrderFinished(o) => o.order_id,
            Event::OrderCancelled(o) => o.order_id,
            Event::OrderRefunded(o) => o.order_id,
            _ => return vec![],
        };
        let placed: Option<Value> =
            sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 AND stream_version = 1")
                .bind(format!("order-{order_id}"))
                .fetch_optional(&self.pool)
                .await
                .ok()
                .flatten();
        let Some(placed) = placed else { return vec![] };
        let mut audience = vec![];
        if let Some(customer) = placed["customer_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) {
            audience.push(customer);
        }
        if let Some(merchant) = placed["merchant_account"].as_str().and_then(|s| Uuid::parse_str(s).ok()) {
            if let Some(owner) = self.owner(merchant).await {
                audience.push(owner);
            }
        }
        audience.sort();
        audience.dedup();
        audience
    }

    /// Forwards one event to the connected users it concerns.
    pub async fn publish(&self, recorded: &RecordedEvent) {
        // No socket at this instance: nobody to tell, and no owner lookups
        // in PostgreSQL for every movement (a reconnecting client replays
        // what it missed from the log with `after_position`).
        if self.clients().is_empty() {
            return;
        }
        let Ok(event) = recorded.decode() else { return };
        // Credentials ended: that user's sockets check theirs again at once.
        let ended = match &event {
            Event::LoggedOut(e) => Some(e.user_id),
            Event::SessionRevoked(e) => Some(e.user_id),
            Event::RefreshTokenReused(e) => Some(e.user_id),
            Event::PasswordChanged(e) => Some(e.user_id),
            Event::UserBlocked(e) => Some(e.user_id),
            Event::ApiKeyRevoked(e) => Some(e.user_id),
            _ => None,
        };
        if let Some(user) = ended {
            self.send(user, RECHECK_NOW);
            return;
        }
        let audience = self.audience(&event).await;
        if audience.is_empty() {
            return;
        }
        let text = message(recorded);
        for user in audience {
            self.send(user, &text);
        }
    }
}

/// A live message: the event's type and position, and its payload's text as
/// stored (copied, not parsed into a tree and written again).
#[derive(Serialize)]
struct LiveMessage<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    position: i64,
    data: &'a store::Payload,
}

fn message(recorded: &RecordedEvent) -> String {
    let message =
        LiveMessage { event_type: &recorded.event_type, position: recorded.position, data: &recorded.payload };
    // Strings, an integer and JSON text that is valid by construction: it serializes.
    serde_json::to_string(&message).unwrap_or_default()
}

/// While sockets are connected, follows JetStream from now on and feeds
/// the hub, reconnecting on errors.
pub async fn run_feed(
    hub: Arc<LiveHub>,
    js: async_nats::jetstream::Context,
    names: NatsNames,
    shutdown: CancellationToken,
) {
    // Whether the last follow ended on an error: the sockets connected then
    // (and since) missed what came in between.
    let mut interrupted = false;
    loop {
        // Registered for a wake-up before looking, so none is missed.
        let wanted = hub.wanted.notified();
        if hub.connected() == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wanted => continue,
            }
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = feed(&hub, &js, &names, interrupted) => result,
        };
        hub.following.send_replace(false);
        match result {
            Ok(()) => {
                interrupted = false;
                tracing::debug!("live feed stopped: no socket connected");
            }
            Err(e) => {
                interrupted = true;
                tracing::warn!(error = %e, "live feed interrupted; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Follows the stream until no socket has been connected for `LINGER`.
/// After an interruption, the sockets connected are told to resync once it
/// follows again: from then on nothing more falls in the gap.
async fn feed(
    hub: &LiveHub,
    js: &async_nats::jetstream::Context,
    names: &NatsNames,
    after_interruption: bool,
) -> Result<(), String> {
    let stream = ensure_stream(js, names).await.map_err(|e| e.to_string())?;
    // Ephemeral and unacknowledged: each instance sees everything from now on;
    // what a socket missed while down comes from the log on reconnect.
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::New,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    // No short heartbeat here: a restart of the feed starts a new consumer
    // from `New`, so what comes in between would not reach connected
    // sockets; the client's reconnection and re-pull ride out a short gap.
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    // The consumer exists: from here nothing more falls in the gap. Told
    // before `following` is set, so a socket that sees it set was told.
    if after_interruption {
        hub.resync_all();
    }
    hub.following.send_replace(true);
    let mut idle_check = tokio::time::interval(LINGER);
    idle_check.tick().await;
    let mut idle = false;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Err("the live feed's message stream ended".into()) };
                let message = message.map_err(|e| e.to_string())?;
                if hub.connected() == 0 {
                    continue;
                }
                if let Ok(recorded) = serde_json::from_slice::<RecordedEvent>(&message.payload) {
                    hub.publish(&recorded).await;
                }
            }
            _ = idle_check.tick() => {
                // Stops when nobody was connected at the last check and nobody is now.
                if idle && hub.stop_following_if_unused() {
                    // Gone at once rather than after its inactivity threshold.
                    let name = consumer.cached_info().name.clone();
                    if let Err(e) = stream.delete_consumer(&name).await {
                        tracing::debug!(error = %e, "the live feed's consumer is left to expire");
                    }
                    return Ok(());
                }
                idle = hub.connected() == 0;
            }
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct LiveQuery {
    /// Replay what this client missed after this log position first.
    pub after_position: Option<i64>,
}

#[utoipa::path(get, path = "/v1/live", tag = "live", params(LiveQuery),
    responses((status = 101, description = "WebSocket: messages {type, position, data}; {\"type\":\"resync\"} when a replay is too far back")))]
pub async fn live(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(query): QueryParams<LiveQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    let upgrade = upgrade.map_err(|e| {
        Problem::new(
            axum::http::StatusCode::BAD_REQUEST,
            "websocket-required",
            format!("this route is a WebSocket: {e}"),
        )
    })?;
    if query.after_position.is_some_and(|p| p < 0) {
        return Err(Problem::validation("after_position", "must be a non-negative integer"));
    }
    let hub = state.live.clone();
    Ok(upgrade.on_upgrade(move |socket| serve_socket(socket, hub, state, user, query.after_position)))
}

/// Whether the socket's credential still holds, as every request would check it.
async fn still_valid(state: &AppState, user: &AuthUser) -> bool {
    match &user.credential {
        Credential::Session { session_id, .. } => matches!(
            state.ledger.check_session(user.user_id, *session_id).await,
            Ok(CredentialCheck::Valid(p)) if !p.blocked
        ),
        Credential::ApiKey { key_id, .. } => {
            matches!(state.ledger.api_key_status(*key_id).await, Ok(Some(p)) if !p.blocked)
        }
    }
}

async fn send(socket: &mut WebSocket, text: String) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await, Ok(Ok(())))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = Message::Close(Some(axum::extract::ws::CloseFrame { code, reason: reason.into() }));
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await;
}

async fn serve_socket(mut socket: WebSocket, hub: Arc<LiveHub>, state: AppState, caller: AuthUser, after: Option<i64>) {
    let user = caller.user_id;
    // Registered before the replay, so nothing falls between the two; a client
    // may see an event twice and keeps the highest position it has seen.
    let (id, mut rx) = hub.register(user);
    // The feed follows the stream before the replay reads the log: an event
    // the replay misses was committed after it read, so published after
    // the consumer started.
    let following = hub.feed_ready().await;
    if let Some(after) = after {
        for text in replay(&hub, user, after).await {
            if !send(&mut socket, text).await {
                hub.unregister(user, id);
                return;
            }
        }
    }
    // No feed yet (NATS unreachable): what happens until it follows again
    // would be missed without a word, so the client is told to resync.
    if !following && !send(&mut socket, json!({ "type": "resync" }).to_string()).await {
        hub.unregister(user, id);
        return;
    }
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.tick().await;
    loop {
        tokio::select! {
            queued = rx.recv() => match queued {
                Some(text) if text == RECHECK_NOW => {
                    if !still_valid(&state, &caller).await {
                        close(&mut socket, 1008, "the session ended").await;
                        break;
                    }
                }
                // A client that stops reading is cut off, not waited for.
                Some(text) => {
                    if !send(&mut socket, text).await {
                        break;
                    }
                }
                // Dropped as too slow (or the hub is gone): say so and close.
                None => {
                    close(&mut socket, 1008, "too slow: reconnect with after_position").await;
                    break;
                }
            },
            _ = recheck.tick() => {
                if !still_valid(&state, &caller).await {
                    close(&mut socket, 1008, "the session ended").await;
                    break;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    hub.unregister(user, id);
}

/// The user's events after `after`, or a single resync message.
async fn replay(hub: &LiveHub, user: Uuid, after: i64) -> Vec<String> {
    let mut conn = match hub.pool.acquire().await {
        Ok(c) => c,
        Err(_) => return vec![json!({ "type": "resync" }).to_string()],
    };
    let from = match store::point_of(&mut conn, after).await {
        Ok(Some(point)) => point,
        Ok(None) if after == 0 => LogPoint::START,
        _ => return vec![json!({ "type": "resync" }).to_string()],
    };
    drop(conn);
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2) LIMIT $3) behind",
    )
    .bind(from.transaction_id.to_string())
    .bind(from.position)
    .bind(REPLAY_LIMIT + 1)
    .fetch_one(&hub.pool)
    .await
    .unwrap_or(REPLAY_LIMIT + 1);
    if count > REPLAY_LIMIT {
        return vec![json!({ "type": "resync" }).to_string()];
    }
    let Ok(mut conn) = hub.pool.acquire().await else { return vec![json!({ "type": "resync" }).to_string()] };
    let through = LogPoint { transaction_id: u64::MAX >> 1, position: i64::MAX };
    let Ok(events) = store::read_range(&mut conn, from, through).await else {
        return vec![json!({ "type": "resync" }).to_string()];
    };
    drop(conn);
    let mut out = vec![];
    for recorded in events {
        let Ok(event) = recorded.decode() else { continue };
        if hub.audience(&event).await.contains(&user) {
            out.push(message(&recorded));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed that failed (here: its stream could not be created, the
    /// subjects being another stream's) tells the sockets connected to
    /// resync once it follows again.
    #[tokio::test]
    async fn an_interrupted_feed_tells_every_connected_socket_to_resync() {
        let nats_url = std::env::var("LEDGER_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let client = async_nats::connect(&nats_url).await.expect("NATS runs");
        let js = async_nats::jetstream::new(client);
        let names = NatsNames::new(&format!("live{}", Uuid::new_v4().simple()));
        let squatter = format!("{}_squatter", names.prefix());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: squatter.clone(),
            subjects: vec![names.subjects()],
            ..Default::default()
        })
        .await
        .expect("a stream on the feed's subjects");
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let hub = Arc::new(LiveHub::new(pool));
        let (_, mut ann) = hub.register(Uuid::new_v4());
        let (_, mut bob) = hub.register(Uuid::new_v4());
        let shutdown = CancellationToken::new();
        let feed = tokio::spawn(run_feed(hub.clone(), js.clone(), names.clone(), shutdown.clone()));
        // Failing: not following, and nothing said yet (nothing is closed).
        let mut following = hub.following.subscribe();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!*following.borrow(), "the feed cannot follow yet");
        assert!(ann.try_recv().is_err() && bob.try_recv().is_err(), "told only once it follows");
        js.delete_stream(&squatter).await.expect("deleted");
        tokio::time::timeout(Duration::from_secs(10), following.wait_for(|f| *f))
            .await
            .expect("the feed follows again")
            .expect("the hub is there");
        let resync = json!({ "type": "resync" }).to_string();
        for socket in [&mut ann, &mut bob] {
            assert_eq!(socket.try_recv().ok().as_deref(), Some(resync.as_str()), "told to resync");
            assert!(socket.try_recv().is_err(), "once");
        }
        shutdown.cancel();
        feed.await.expect("the feed stops");
        js.delete_stream(names.stream()).await.expect("the feed's stream deleted");
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_not_buffered() {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let hub = LiveHub::new(pool);
        let user = Uuid::new_v4();
        let (_, mut slow) = hub.register(user);
        let (_, mut other) = hub.register(Uuid::new_v4());
        for i in 0..QUEUE {
            hub.send(user, &format!("{i}"));
        }
        assert_eq!(hub.connected(), 2, "a full queue is still connected");
        hub.send(user, "one too many");
        assert_eq!(hub.connected(), 1, "the slow socket is gone");
        let mut received = 0;
        while slow.recv().await.is_some() {
            received += 1;
        }
        assert_eq!(received, QUEUE, "what was queued is delivered, then the channel closes");
        assert!(other.try_recv().is_err(), "other users got nothing");
    }
}
