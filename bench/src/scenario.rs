//! The scenarios and the load loop that drives them.

use crate::client::{Answer, Http};
use crate::machine::{self, CpuTicks, MachineUse};
use crate::setup::World;
use crate::wire::Wire;
use crate::Args;
use anyhow::bail;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Transfers among all accounts, uniformly at random.
    Uniform,
    /// Every transfer credits one merchant account.
    Hot,
    /// Every transfer debits one well-funded account.
    HotDebit,
    /// Every transfer is sent twice under one key; the second must replay.
    Retry,
    /// 80% balance reads, 20% transfers.
    Mixed,
    /// A hold placed by the payer, then captured by the payee.
    Holds,
    /// Atomic batches of `--batch-size` transfers: one account pays many.
    Batch,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Uniform,
        Scenario::Hot,
        Scenario::HotDebit,
        Scenario::Retry,
        Scenario::Mixed,
        Scenario::Holds,
        Scenario::Batch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Uniform => "uniform",
            Scenario::Hot => "hot",
            Scenario::HotDebit => "hot-debit",
            Scenario::Retry => "retry",
            Scenario::Mixed => "mixed",
            Scenario::Holds => "holds",
            Scenario::Batch => "batch",
        }
    }

    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Scenario>> {
        if list == "all" {
            return Ok(Scenario::ALL.to_vec());
        }
        list.split(',')
            .map(|name| match Scenario::ALL.iter().find(|s| s.name() == name.trim()) {
                Some(s) => Ok(*s),
                None => {
                    bail!("unknown scenario {name:?}; known: all, {}", Scenario::ALL.map(Scenario::name).join(", "))
                }
            })
            .collect()
    }
}

/// Latencies in microseconds, up to a minute, three significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 digits is valid"))
}

/// What one scenario run measured.
pub struct RunResult {
    pub scenario: Scenario,
    pub connections: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub requests: u64,
    pub transfers: u64,
    pub latency: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Time from a write's answer to its effect being readable, microseconds.
    pub lag: Histogram<u64>,
    /// Lag p99 in the first and the second half of the run: a growing lag
    /// means the read side does not keep up.
    pub lag_p99_halves: (u64, u64),
    pub lag_failures: u64,
    /// Per second of the measured run: requests, those over
    /// [`SLOW_MICROS`], and the slowest (µs). A tail from a few stalled
    /// seconds looks different here from one spread over the run.
    pub by_second: Vec<Second>,
    /// The machine over the measured window (Linux only).
    pub machine: Option<MachineUse>,
}

/// A request slower than this counts as slow in the per-second timeline
/// (the half-load latency target).
pub const SLOW_MICROS: u64 = 25_000;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Second {
    pub requests: u64,
    pub slow: u64,
    pub max_micros: u64,
}

fn merge_seconds(into: &mut Vec<Second>, from: &[Second]) {
    if into.len() < from.len() {
        into.resize(from.len(), Second::default());
    }
    for (a, b) in into.iter_mut().zip(from) {
        a.requests += b.requests;
        a.slow += b.slow;
        a.max_micros = a.max_micros.max(b.max_micros);
    }
}

/// One connection's tallies, merged at the end.
struct Tally {
    requests: u64,
    transfers: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    measure_from: Instant,
    by_second: Vec<Second>,
}

impl Tally {
    fn new(measure_from: Instant) -> Tally {
        Tally {
            requests: 0,
            transfers: 0,
            latency: histogram(),
            errors: BTreeMap::new(),
            measure_from,
            by_second: Vec::new(),
        }
    }

    fn record(&mut self, measuring: bool, started: Instant, answer: &Answer) {
        if !measuring {
            return;
        }
        self.requests += 1;
        let micros = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
        let _ = self.latency.record(micros);
        let second = started.saturating_duration_since(self.measure_from).as_secs() as usize;
        if self.by_second.len() <= second {
            self.by_second.resize(second + 1, Second::default());
        }
        let s = &mut self.by_second[second];
        s.requests += 1;
        s.slow += u64::from(micros > SLOW_MICROS);
        s.max_micros = s.max_micros.max(micros);
        if !answer.ok() {
            *self.errors.entry(answer.error_kind()).or_default() += 1;
        }
    }

    fn error(&mut self, measuring: bool, kind: &str) {
        if measuring {
            *self.errors.entry(kind.to_owned()).or_default() += 1;
        }
    }
}

type LagSamples = Arc<Mutex<Vec<(Duration, u64)>>>;

struct Shared<'a> {
    world: &'a World,
    args: &'a Args,
    scenario: Scenario,
    measure_from: Instant,
    lag: LagSamples,
    lag_failures: Arc<Mutex<u64>>,
    /// Tells apart the keys of two runs of one scenario.
    nonce: u64,
}

pub async fn run(http: &Http, world: &World, args: &Args, scenario: Scenario) -> anyhow::Result<RunResult> {
    Wire::new(&args.url)?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let shared = Shared {
        world,
        args,
        scenario,
        measure_from,
        lag: Arc::new(Mutex::new(Vec::new())),
        lag_failures: Arc::new(Mutex::new(0)),
        nonce: rand::random(),
    };
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel::<LagProbe>();
    let workers: Vec<_> =
        (0..args.connections).map(|conn| connection(&shared, conn, start, end, probe_tx.clone())).collect();
    drop(probe_tx);
    // Lag probes run beside the load, each on its own task.
    let lag = shared.lag.clone();
    let lag_failures = shared.lag_failures.clone();
    let http_for_probes = http.clone();
    let prober = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        while let Some(probe) = probe_rx.recv().await {
            let http = http_for_probes.clone();
            let lag = lag.clone();
            let lag_failures = lag_failures.clone();
            set.spawn(async move {
                let answer = http
                    .get(&format!("/v1/accounts/{}?min_position={}", probe.account, probe.position), &probe.token)
                    .await;
                if answer.ok() {
                    let micros = probe.answered.elapsed().as_micros() as u64;
                    if let Ok(mut samples) = lag.lock() {
                        samples.push((probe.answered.saturating_duration_since(probe.measure_from), micros));
                    }
                } else if let Ok(mut n) = lag_failures.lock() {
                    *n += 1;
                }
            });
        }
        while set.join_next().await.is_some() {}
    });
    // The machine's counters at the measured window's ends, and the pages
    // written back at each of its seconds.
    let machine = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = CpuTicks::now();
        let mut written = vec![machine::written_pages_now()];
        let mut second = measure_from;
        while second < end {
            second = (second + Duration::from_secs(1)).min(end);
            tokio::time::sleep_until(second.into()).await;
            written.push(machine::written_pages_now());
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let mut used = MachineUse::between(before?, CpuTicks::now()?, cores)?;
        used.written_back_mb_by_second = machine::written_back_mb(&written);
        Some(used)
    });
    let tallies = futures::future::join_all(workers).await;
    let _ = prober.await;
    let machine = machine.await.ok().flatten();
    let mut total = Tally::new(measure_from);
    for t in tallies {
        merge_seconds(&mut total.by_second, &t.by_second);
        total.requests += t.requests;
        total.transfers += t.transfers;
        let _ = total.latency.add(&t.latency);
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let samples = shared.lag.lock().map(|s| s.clone()).unwrap_or_default();
    let half = Duration::from_secs_f64(args.duration / 2.0);
    let mut lag = histogram();
    let mut first = histogram();
    let mut second = histogram();
    for (at, micros) in &samples {
        let v = (*micros).clamp(1, 60_000_000);
        let _ = lag.record(v);
        let _ = if *at < half { first.record(v) } else { second.record(v) };
    }
    let lag_failures = shared.lag_failures.lock().map(|n| *n).unwrap_or_default();
    Ok(RunResult {
        scenario,
        connections: args.connections,
        rate: args.rate,
        seconds: args.duration,
        requests: total.requests,
        transfers: total.transfers,
        latency: total.latency,
        errors: total.errors,
        lag,
        lag_p99_halves: (first.value_at_quantile(0.99), second.value_at_quantile(0.99)),
        lag_failures,
        by_second: total.by_second,
        machine,
    })
}

struct LagProbe {
    account: uuid::Uuid,
    token: String,
    position: i64,
    answered: Instant,
    measure_from: Instant,
}

async fn connection(
    shared: &Shared<'_>,
    conn: usize,
    start: Instant,
    end: Instant,
    probes: tokio::sync::mpsc::UnboundedSender<LagProbe>,
) -> Tally {
    let mut tally = Tally::new(shared.measure_from);
    // Fixed rate: this connection's share of the schedule, offset so the
    // connections do not all fire at once.
    let interval = shared.args.rate.map(|r| Duration::from_secs_f64(shared.args.connections as f64 / r));
    let mut due = start + interval.map(|i| i.mul_f64(conn as f64 / shared.args.connections as f64)).unwrap_or_default();
    let mut seq: u64 = 0;
    let mut writes: u64 = 0;
    // The address was checked before the load started.
    let Ok(mut wire) = Wire::new(&shared.args.url) else { return tally };
    loop {
        let started = match interval {
            Some(i) => {
                let d = due;
                due += i;
                tokio::time::sleep_until(d.into()).await;
                d
            }
            None => Instant::now(),
        };
        if started >= end {
            break;
        }
        let measuring = started >= shared.measure_from;
        seq += 1;
        let key = format!("{}-{}-{}-{conn}-{seq}", shared.world.run_id, shared.scenario.name(), shared.nonce);
        if let Some((account, token, position)) =
            operation(shared, &mut wire, &key, started, measuring, &mut tally).await
        {
            // Counted in transfers: a `batch` request is 100 of them, and
            // counted in requests its ~20 per connection gave one probe each,
            // all at the end of the run.
            let before = writes;
            writes += match shared.scenario {
                Scenario::Batch => shared.args.batch_size as u64,
                _ => 1,
            };
            let every = shared.args.lag_every;
            if measuring && every > 0 && before / every != writes / every {
                let _ = probes.send(LagProbe {
                    account,
                    token: token.to_owned(),
                    position,
                    answered: Instant::now(),
                    measure_from: shared.measure_from,
                });
            }
        }
    }
    tally
}

/// A request body (a `Value` always serializes).
fn body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn pick(rng: &mut impl Rng, n: usize) -> usize {
    rng.gen_range(0..n)
}

/// Two distinct accounts.
fn pair(rng: &mut impl Rng, n: usize) -> (usize, usize) {
    let a = pick(rng, n);
    let b = (a + 1 + pick(rng, n - 1)) % n;
    (a, b)
}

/// Runs one operation of the scenario. Returns, for a successful write, an
/// account of the caller's whose balance it changed and the write's position
/// (for the lag probe).
async fn operation<'w>(
    shared: &Shared<'w>,
    wire: &mut Wire,
    key: &str,
    started: Instant,
    measuring: bool,
    tally: &mut Tally,
) -> Option<(uuid::Uuid, &'w str, i64)> {
    let world = shared.world;
    let n = world.accounts.len();
    let (from, to, mixed_read) = {
        let mut rng = rand::thread_rng();
        let (a, b) = pair(&mut rng, n);
        match shared.scenario {
            Scenario::Hot => (&world.accounts[a], &world.merchant, false),
            Scenario::HotDebit => (&world.hub, &world.accounts[b], false),
            Scenario::Mixed => (&world.accounts[a], &world.accounts[b], rng.gen_bool(0.8)),
            _ => (&world.accounts[a], &world.accounts[b], false),
        }
    };
    let token = world.token(from);
    let transfer = json!({ "from_account": from.id, "to_account": to.id, "amount": "0.01" });
    match shared.scenario {
        Scenario::Uniform | Scenario::Hot | Scenario::HotDebit | Scenario::Mixed if !mixed_read => {
            let answer = wire.post("/v1/transfers", token, key, &body(&transfer)).await;
            tally.record(measuring, started, &answer);
            if answer.status == 201 {
                tally.transfers += u64::from(measuring);
                return answer.position().map(|p| (from.id, token, p));
            }
            None
        }
        Scenario::Mixed => {
            let answer = wire.get(&format!("/v1/accounts/{}", from.id), token).await;
            tally.record(measuring, started, &answer);
            None
        }
        Scenario::Retry => {
            let first = wire.post("/v1/transfers", token, key, &body(&transfer)).await;
            tally.record(measuring, started, &first);
            let again_started = Instant::now();
            let again = wire.post("/v1/transfers", token, key, &body(&transfer)).await;
            tally.record(measuring, again_started, &again);
            if first.ok() && (!again.replayed || again.status != first.status || again.body != first.body) {
                tally.error(measuring, "retry answered differently from the first request");
            }
            if first.status == 201 {
                tally.transfers += u64::from(measuring);
                return first.position().map(|p| (from.id, token, p));
            }
            None
        }
        Scenario::Holds => {
            let mut hold = transfer;
            hold["expires_in_seconds"] = json!(600);
            let placed = wire.post("/v1/holds", token, key, &body(&hold)).await;
            tally.record(measuring, started, &placed);
            let hold_id = placed.body.get("hold_id").and_then(Value::as_str)?.to_owned();
            let capture_started = Instant::now();
            let captured = wire
                .post(&format!("/v1/holds/{hold_id}/capture"), world.token(to), &format!("{key}-capture"), b"{}")
                .await;
            tally.record(measuring, capture_started, &captured);
            if captured.ok() {
                tally.transfers += u64::from(measuring);
                return captured.position().map(|p| (from.id, token, p));
            }
            None
        }
        Scenario::Batch => {
            // All debited accounts belong to the caller: one user's accounts.
            // A payout: one of the caller's accounts pays `--batch-size` others.
            let items: Vec<Value> = {
                let mut rng = rand::thread_rng();
                (0..shared.args.batch_size)
                    .map(|i| {
                        let mut credit = &world.accounts[pick(&mut rng, n)];
                        if credit.id == from.id {
                            credit = to;
                        }
                        json!({ "key": format!("{key}-{i}"), "from_account": from.id,
                                "to_account": credit.id, "amount": "0.01" })
                    })
                    .collect()
            };
            let answer = wire
                .post("/v1/transfers/batch", token, key, &body(&json!({ "transfers": items, "atomic": true })))
                .await;
            tally.record(measuring, started, &answer);
            if answer.ok() {
                tally.transfers += u64::from(measuring) * shared.args.batch_size as u64;
                return answer.position().map(|p| (from.id, token, p));
            }
            None
        }
        Scenario::Uniform | Scenario::Hot | Scenario::HotDebit => None,
    }
}
