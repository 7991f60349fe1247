//! A projector: a JetStream durable consumer that applies events to read
//! models. A server runs one for all of them: one delivery of each event per
//! instance, and one transaction per batch in which every read model applies
//! the batch and moves its own checkpoint. Anything at or below a read
//! model's checkpoint is skipped for it, so redelivery, crashes and a rebuild
//! that moved one checkpoint have no second effect.
//!
//! JetStream is the fan-out, not the source of truth: before applying a batch
//! the projector counts the log's events between its checkpoint and the
//! batch's end, per read model. If delivery skipped any (a lost stream, a redelivery out of
//! order), it reads that range from the log instead; and a run starts by
//! applying from the log whatever lies past the checkpoints. Nothing is lost.

use crate::statements::{self, LastEntries};
use crate::{checkpoint, movement_run, Projection, ProjectionError};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Message};
use futures::StreamExt;
use ledger_commands::nats::{ensure_stream, NatsNames, PULL_HEARTBEAT};
use ledger_commands::relay::PACED_BELOW;
use ledger_commands::store::{self, LogPoint, ReadSideProgress, RecordedEvent};
use ledger_domain::Event;
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MAX_BATCH: usize = 500;
/// How long a starting run waits for committed events to settle, and how
/// often it looks.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// A kept connection unused for this long is pinged before its next batch.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);
/// A ping not answered in this long counts as failed (a connection cut off
/// by a failover or a partition would otherwise hang until TCP gives up).
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Projector {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub names: NatsNames,
    /// The read models it maintains, each with its own checkpoint.
    pub projections: Vec<Projection>,
    /// Publishes the batch's end (and the highest position applied) after
    /// every commit, and for a batch another instance had applied already,
    /// for in-process waiters (`read_side::wait_for_applied`, the batches'
    /// `ReadSideGate`): every read model is at or past it.
    pub applied: watch::Sender<ReadSideProgress>,
    /// After a small batch (under `PACED_BELOW` events), the shortest time
    /// from its start to the next one's. Under a light load deliveries come
    /// a few at a time, and a batch's fixed cost (a transaction, the
    /// checkpoint lock, a statement per read model) is paid for a handful of
    /// events; waiting a few milliseconds lets them gather. Zero: each batch
    /// as soon as the previous one is done.
    pub pace: Duration,
}

/// How many more looks a backlog's batch takes, each after a yield, for
/// events still arriving.
const GATHER_ROUNDS: usize = 4;

/// Which way a batch's transaction may write the read models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WritePath {
    /// In one statement if the batch is a run of movements
    /// (`movement_run::qualify`), else per read model.
    OneStatementIfItQualifies,
    /// Each read model its own statements: lists once a transfer the log
    /// holds twice, which the one statement cannot.
    PerReadModel,
}

/// What a batch's transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchOutcome {
    /// Applied and committed, or already applied (by another instance).
    Done,
    /// Rolled back with nothing written: the one statement found a movement
    /// listed already. The batch must go again `WritePath::PerReadModel`.
    SentBack,
}

/// Moves into `batch` what `stream` has ready now, up to `max`; stops after
/// an error item (the batch fails with it). Unconstrained: the task's
/// Tokio budget (128 channel reads per poll, shared with the relay, which
/// runs in the same task) would otherwise cut a batch short at whatever the
/// relay left of it, though every message is already in the client's channel.
async fn drain_ready<S, T, E>(stream: &mut S, batch: &mut Vec<Result<T, E>>, max: usize)
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
{
    tokio::task::unconstrained(async {
        while batch.len() < max && !batch.last().is_some_and(Result::is_err) {
            match futures::FutureExt::now_or_never(stream.next()) {
                Some(Some(item)) => batch.push(item),
                _ => return,
            }
        }
    })
    .await;
}

/// A batch that is a backlog's first part grows to `max` with what is ready,
/// then with what arrives within a few yields (the connection's task, on the
/// same thread, reads on meanwhile). A batch's cost is mostly its round
/// trips, so larger batches apply a backlog faster. It stops at the first
/// look that finds nothing new, so it never waits for events not yet sent.
async fn gather_backlog<S, T, E>(stream: &mut S, batch: &mut Vec<Result<T, E>>, max: usize)
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
{
    drain_ready(stream, batch, max).await;
    for _ in 0..GATHER_ROUNDS {
        if batch.len() >= max || batch.iter().any(Result::is_err) {
            return;
        }
        tokio::task::yield_now().await;
        let before = batch.len();
        drain_ready(stream, batch, max).await;
        if batch.len() == before {
            return;
        }
    }
}

impl Projector {
    /// The durable consumer's name: the read model's own when there is one,
    /// else the whole read side's.
    fn consumer_name(&self) -> String {
        match self.projections.as_slice() {
            [one] => self.names.consumer(one.name()),
            _ => self.names.consumer("read-side"),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = ledger_commands::backoff::Backoff::follower();
        loop {
            let started = Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.consume() => {
                    if let Err(e) = result {
                        tracing::warn!(consumer = %self.consumer_name(), error = %e, "projector interrupted; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.after(started.elapsed())) => {}
            }
        }
    }

    async fn consume(&self) -> Result<(), ProjectionError> {
        let nats = |e: &dyn std::fmt::Display| ProjectionError::Nats(e.to_string());
        // A connection of its own for as long as this consumer runs: one
        // from the pool is pinged when handed out and when given back, two
        // round trips per batch. It is pinged only after a pause (it may
        // have died while idle: a database restart) and replaced if that
        // fails. A batch that fails on it is applied once more on a fresh
        // one: its transaction rolled back, and anything of it that did
        // commit is at or below the checkpoints, so skipped. A run that ends
        // leaves its batch unacknowledged until JetStream redelivers it
        // (`ack_wait`, 30 s); the next run's catch-up applies it from the log first.
        // The catch-up comes before anything is asked of NATS: the read side
        // reaches the log's head even while JetStream is slow or away.
        let mut conn = self.pool.acquire().await?.detach();
        let mut used = Instant::now();
        let mut last_entries = LastEntries::default();
        if let Err(e) = self.catch_up(&mut conn, &mut last_entries).await {
            tracing::warn!(error = %e, "catching up from the log failed; trying again on a fresh connection");
            last_entries.forget();
            conn = self.pool.acquire().await?.detach();
            self.catch_up(&mut conn, &mut last_entries).await?;
        }
        // NATS's side of the run, within two heartbeats: a hung server
        // would otherwise hold the run for the client's request timeout
        // (10 s) before the next run's catch-up.
        let name = self.consumer_name();
        let messages = tokio::time::timeout(PULL_HEARTBEAT * 2, async {
            let stream = ensure_stream(&self.js, &self.names).await.map_err(|e| nats(&e))?;
            let consumer = stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        ack_policy: AckPolicy::All,
                        deliver_policy: DeliverPolicy::All,
                        ack_wait: Duration::from_secs(30),
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| nats(&e))?;
            consumer
                .stream()
                .max_messages_per_batch(MAX_BATCH)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
                .map_err(|e| nats(&e))
        })
        .await
        .map_err(|_| ProjectionError::Nats("NATS did not answer the consumer's set-up in time".into()))??;
        tracing::info!(consumer = %name, "projector consuming");
        let mut batches = messages.ready_chunks(MAX_BATCH);
        // When the last batch started, if it was a small one.
        let mut last_small: Option<Instant> = None;
        while let Some(mut batch) = batches.next().await {
            // Only small after small: a burst arriving after a quiet spell
            // (the onset of the peak, a backlog) is applied at once.
            let small = batch.len() < PACED_BELOW;
            if let Some(started) = last_small.filter(|_| small && !self.pace.is_zero()) {
                let due = started + self.pace;
                if Instant::now() < due {
                    tokio::time::sleep_until(due.into()).await;
                    // What arrived while waiting joins this batch.
                    drain_ready(batches.get_mut(), &mut batch, MAX_BATCH).await;
                }
            }
            if !small {
                gather_backlog(batches.get_mut(), &mut batch, MAX_BATCH).await;
            }
            last_small = (batch.len() < PACED_BELOW).then(Instant::now);
            let mut received = Vec::with_capacity(batch.len());
            for message in batch {
                received.push(message.map_err(|e| nats(&e))?);
            }
            if used.elapsed() >= PING_AFTER_IDLE
                && !matches!(tokio::time::timeout(PING_TIMEOUT, conn.ping()).await, Ok(Ok(())))
            {
                conn = self.pool.acquire().await?.detach();
            }
            if let Err(e) = self.apply_batch(&mut conn, &received, &mut last_entries).await {
                tracing::warn!(error = %e, "a batch failed; applying it again on a fresh connection");
                last_entries.forget();
                conn = self.pool.acquire().await?.detach();
                self.apply_batch(&mut conn, &received, &mut last_entries).await?;
            }
            used = Instant::now();
        }
        Err(ProjectionError::Nats("message stream ended".into()))
    }

    /// Applies what the log holds past the read models' checkpoints, in
    /// batches, before the run takes deliveries. JetStream may not bring it
    /// soon: a batch a failed run left unacknowledged waits out `ack_wait`
    /// (30 s) unless a later delivery shows the gap, and events whose
    /// messages were lost (a stream deleted and recreated) come only with
    /// such a later delivery. Deliveries of what this applied are skipped.
    async fn catch_up(&self, conn: &mut PgConnection, last_entries: &mut LastEntries) -> Result<(), ProjectionError> {
        let mut applied = 0usize;
        // Waited for: what is committed now. Under a steady load there is
        // always a newer unsettled tail, which deliveries will bring.
        let head = store::head(conn).await?;
        let settle_by = Instant::now() + SETTLE_WAIT;
        loop {
            let saved = checkpoint::all(conn).await?;
            let from = self
                .projections
                .iter()
                .map(|p| saved.iter().find(|(name, _)| name == p.name()).map_or(LogPoint::START, |(_, at)| *at))
                .min()
                .unwrap_or(LogPoint::START);
            let events = store::read_settled_after(conn, from, MAX_BATCH as i64).await?;
            let unsettled_before_head = match head.filter(|h| events.is_empty() && *h > from) {
                Some(head) if Instant::now() < settle_by => store::count_range(conn, from, head).await? > 0,
                _ => false,
            };
            if unsettled_before_head {
                // Committed but not settled: a transaction that began before
                // them is still open (in any database of the cluster:
                // transaction ids are the cluster's). Deliveries would wait
                // for the same, and a run with none coming (the relay
                // stopped) would never apply them.
                tokio::time::sleep(SETTLE_POLL).await;
                continue;
            }
            if events.is_empty() {
                if applied > 0 {
                    tracing::info!(consumer = %self.consumer_name(), events = applied, "caught up from the log");
                }
                return Ok(());
            }
            applied += events.len();
            self.apply_events(conn, events, last_entries).await?;
        }
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[Message],
        last_entries: &mut LastEntries,
    ) -> Result<(), ProjectionError> {
        let events: Vec<RecordedEvent> = messages
            .iter()
            .filter_map(|m| match serde_json::from_slice::<RecordedEvent>(&m.payload) {
                Ok(e) => Some(e),
                Err(e) => {
                    // The range check below reads it from the log instead.
                    tracing::error!(error = %e, "unreadable message on the event stream");
                    None
                }
            })
            .collect();
        self.apply_events(conn, events, last_entries).await?;
        // AckPolicy::All: acknowledging the last message acknowledges the batch.
        if let Some(last) = messages.last() {
            last.ack().await.map_err(|e| ProjectionError::Nats(e.to_string()))?;
        }
        Ok(())
    }

    /// Applies events (delivered, or read from the log) in one transaction
    /// per batch: each read model what lies past its own checkpoint.
    async fn apply_events(
        &self,
        conn: &mut PgConnection,
        mut events: Vec<RecordedEvent>,
        last_entries: &mut LastEntries,
    ) -> Result<(), ProjectionError> {
        events.sort_by_key(RecordedEvent::point);
        events.dedup_by_key(|e| e.point());
        if self.apply_in_transaction(conn, &events, last_entries, WritePath::OneStatementIfItQualifies).await?
            == BatchOutcome::SentBack
        {
            // A movement was listed already: the general path lists each once.
            self.apply_in_transaction(conn, &events, last_entries, WritePath::PerReadModel).await?;
        }
        Ok(())
    }

    /// One batch's transaction. A batch of movements only goes in one
    /// statement (`movement_run`) if `path` allows, the accounts' last
    /// entries taken from memory or looked up; sent back if that found a
    /// movement listed already (rolled back: nothing of the batch was
    /// written).
    async fn apply_in_transaction(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
        last_entries: &mut LastEntries,
        path: WritePath,
    ) -> Result<BatchOutcome, ProjectionError> {
        let Some(through) = events.last().map(RecordedEvent::point) else {
            return Ok(BatchOutcome::Done);
        };
        let began = Instant::now();
        let mut tx = conn.begin().await?;
        let names: Vec<&str> = self.projections.iter().map(|p| p.name()).collect();
        let checkpoints = checkpoint::lock_counting(&mut tx, &names, through).await?;
        // Each projection applies what lies after its own checkpoint. If
        // delivery skipped any of that, the batch comes from the log.
        let skipped =
            checkpoints.iter().find(|c| events.iter().filter(|e| e.point() > c.at).count() as i64 != c.in_log);
        let logged = match skipped {
            Some(c) => {
                tracing::warn!(
                    projection = c.projection.as_str(),
                    delivered = events.iter().filter(|e| e.point() > c.at).count(),
                    in_log = c.in_log,
                    "delivery skipped events; reading the range from the log"
                );
                let earliest = checkpoints.iter().map(|c| c.at).min().unwrap_or(c.at);
                Some(store::read_range(&mut tx, earliest, through).await?)
            }
            None => None,
        };
        let source: &[RecordedEvent] = logged.as_deref().unwrap_or(events);
        let mut work: Vec<(Projection, &checkpoint::Locked, Vec<&RecordedEvent>)> = Vec::new();
        for c in &checkpoints {
            let Some(projection) = self.projections.iter().copied().find(|p| p.name() == c.projection) else {
                continue;
            };
            let mine: Vec<&RecordedEvent> = source.iter().filter(|e| e.point() > c.at).collect();
            if !mine.is_empty() {
                work.push((projection, c, mine));
            }
        }
        let highest_position = source.iter().map(|e| e.position).max().unwrap_or_default();
        if work.is_empty() {
            tx.rollback().await?;
            // Every read model was already at or past the batch's end
            // (another instance applied it): that is progress too.
            self.publish_applied(through, highest_position);
            return Ok(BatchOutcome::Done);
        }
        // Decoded once for every projection.
        let mut decoded: HashMap<LogPoint, Event> = HashMap::new();
        for (_, _, mine) in &work {
            for recorded in mine {
                if let std::collections::hash_map::Entry::Vacant(slot) = decoded.entry(recorded.point()) {
                    let event = recorded
                        .decode()
                        .map_err(|source| ProjectionError::Decode { position: recorded.position, source })?;
                    slot.insert(event);
                }
            }
        }
        let moved: Vec<(Projection, LogPoint)> = work.iter().map(|(p, _, _)| (*p, through)).collect();
        let run = match path {
            WritePath::OneStatementIfItQualifies => movement_run::qualify(&self.projections, &work, source, &decoded),
            WritePath::PerReadModel => None,
        };
        let taken;
        let (saved, statements_applied) = match run {
            Some(movements) => {
                taken = "one statement";
                let planned = movement_run::plan(&mut tx, &work, &movements, last_entries).await?;
                match movement_run::apply(&mut tx, &movements, &moved, planned).await? {
                    movement_run::Outcome::Applied { saved, statements } => (saved, statements),
                    movement_run::Outcome::AlreadyListed => {
                        tx.rollback().await?;
                        tracing::debug!(
                            events = source.len(),
                            "a movement's transfer was listed already; the batch goes per read model"
                        );
                        return Ok(BatchOutcome::SentBack);
                    }
                }
            }
            None => {
                taken = "per read model";
                let mut statements_applied = None;
                for (projection, from, mine) in &work {
                    let pairs: Vec<(&RecordedEvent, &Event)> =
                        mine.iter().filter_map(|r| decoded.get(&r.point()).map(|e| (*r, e))).collect();
                    match projection {
                        Projection::Statements => {
                            statements_applied = Some(
                                statements::apply_remembering(&mut tx, &pairs, last_entries, from.at, from.written)
                                    .await?,
                            );
                        }
                        _ => projection.apply_decoded(&mut tx, &pairs).await?,
                    }
                }
                let names: Vec<(&str, LogPoint)> = moved.iter().map(|(p, at)| (p.name(), *at)).collect();
                (checkpoint::save_all(&mut tx, &names).await?, statements_applied)
            }
        };
        tx.commit().await?;
        tracing::trace!(
            events = source.len(),
            path = taken,
            transaction_ms = began.elapsed().as_secs_f64() * 1000.0,
            newest_age_ms = ledger_commands::relay::age_ms(source.iter().map(|e| e.metadata.recorded_at).max()),
            oldest_age_ms = ledger_commands::relay::age_ms(source.iter().map(|e| e.metadata.recorded_at).min()),
            "batch applied"
        );
        let statements_saved = saved.iter().find(|(name, _)| name == Projection::Statements.name());
        if let (Some(applied), Some((_, written))) = (statements_applied, statements_saved) {
            last_entries.committed(through, *written, applied);
        }
        self.publish_applied(through, highest_position);
        Ok(BatchOutcome::Done)
    }

    /// Tells read-your-writes waits and the batches' gate that every read
    /// model is at or past `through`. Never backwards: a later batch's end is
    /// past every earlier one's.
    fn publish_applied(&self, through: LogPoint, highest_position: i64) {
        self.applied.send_if_modified(|at| {
            let moved = through > at.through || highest_position > at.highest_position;
            at.through = at.through.max(through);
            at.highest_position = at.highest_position.max(highest_position);
            moved
        });
    }
}

#[cfg(test)]
mod tests {
    use super::gather_backlog;
    use futures::StreamExt;
    use std::convert::Infallible;

    type Items = std::pin::Pin<Box<dyn futures::Stream<Item = Result<usize, Infallible>>>>;

    /// A Tokio channel, as the NATS client's subscriptions are (each read
    /// spends the task's budget); `chunks` chunks of `size` items are sent,
    /// the first at once and one more each time the receiving task yields,
    /// as the connection's reader hands them over.
    fn reader(chunks: usize, size: usize) -> Items {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..size {
            tx.send(Ok(i)).expect("open");
        }
        tokio::spawn(async move {
            for chunk in 1..chunks {
                for i in 0..size {
                    if tx.send(Ok(chunk * size + i)).is_err() {
                        return;
                    }
                }
                tokio::task::yield_now().await;
            }
        });
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    /// What one `ready_chunks` poll hands over: what is ready now, as far as
    /// the task's budget goes.
    async fn first_read(items: &mut Items) -> Vec<Result<usize, Infallible>> {
        let mut batch = vec![items.next().await.expect("an item")];
        while let Some(Some(item)) = futures::FutureExt::now_or_never(items.next()) {
            batch.push(item);
        }
        batch
    }

    fn numbers(batch: Vec<Result<usize, Infallible>>) -> Vec<usize> {
        batch.into_iter().map(|r| r.unwrap_or_else(|e| match e {})).collect()
    }

    #[tokio::test]
    async fn a_backlog_already_received_is_taken_up_to_the_limit_past_the_tasks_budget() {
        let mut items = reader(1, 1000);
        let mut batch = first_read(&mut items).await;
        assert!(batch.len() < 500, "the task's budget cut the first read short: {}", batch.len());
        // The budget is spent (as the relay, in the same task, may spend it).
        assert!(!tokio::task::coop::has_budget_remaining());
        let yielded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = yielded.clone();
        tokio::spawn(async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) });
        gather_backlog(&mut items, &mut batch, 500).await;
        assert_eq!(numbers(batch), (0..500).collect::<Vec<_>>(), "up to the limit, in order");
        assert!(
            !yielded.load(std::sync::atomic::Ordering::SeqCst),
            "what was already received is taken at once, without waiting for a turn"
        );
        let mut next = first_read(&mut items).await;
        gather_backlog(&mut items, &mut next, 500).await;
        assert_eq!(numbers(next), (500..1000).collect::<Vec<_>>(), "the rest is the next batch");
    }

    #[tokio::test]
    async fn a_backlog_still_arriving_is_gathered_over_a_few_yields() {
        let mut items = reader(10, 100);
        let mut batch = first_read(&mut items).await;
        assert_eq!(batch.len(), 100);
        gather_backlog(&mut items, &mut batch, 500).await;
        assert_eq!(numbers(batch), (0..500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn gathering_stops_when_nothing_more_is_arriving() {
        let mut items = reader(2, 100);
        let mut batch = first_read(&mut items).await;
        gather_backlog(&mut items, &mut batch, 500).await;
        assert_eq!(numbers(batch), (0..200).collect::<Vec<_>>(), "applied with what came");
    }

    #[tokio::test]
    async fn gathering_stops_at_an_error() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<usize, &str>>();
        for item in [Ok(0), Ok(1), Err("broken"), Ok(3)] {
            tx.send(item).expect("open");
        }
        let mut items = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut batch = vec![items.next().await.expect("an item")];
        gather_backlog(&mut items, &mut batch, 500).await;
        assert_eq!(batch, vec![Ok(0), Ok(1), Err("broken")], "the batch fails with the error; nothing after it");
    }
}
