//! Printing and recording a scenario's figures.

use crate::checks::CheckResult;
use crate::scenario::{RunResult, Second, SLOW_MICROS};
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::Write;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn print(r: &RunResult, check: Option<&CheckResult>) {
    println!(
        "\n== {} ({} connections, {}) ==",
        r.scenario.name(),
        r.connections,
        match r.rate {
            Some(rate) => format!("fixed rate {rate}/s"),
            None => "closed loop".into(),
        }
    );
    println!(
        "requests/s {:>10.1}   transfers/s {:>10.1}   ({} requests, {} transfers in {} s)",
        r.requests as f64 / r.seconds,
        r.transfers as f64 / r.seconds,
        r.requests,
        r.transfers,
        r.seconds
    );
    println!(
        "latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(&r.latency, 0.5),
        ms(&r.latency, 0.9),
        ms(&r.latency, 0.99),
        ms(&r.latency, 0.999),
        r.latency.max() as f64 / 1000.0
    );
    println!(
        "projection lag ms (201 -> readable via min_position, {} probes)  p50 {:.2}  p99 {:.2}  \
         p99 first half {:.2}, second half {:.2}; failed probes {}",
        r.lag.len(),
        ms(&r.lag, 0.5),
        ms(&r.lag, 0.99),
        r.lag_p99_halves.0 as f64 / 1000.0,
        r.lag_p99_halves.1 as f64 / 1000.0,
        r.lag_failures
    );
    println!("slow (> {} ms) by second: {}", SLOW_MICROS / 1000, timeline(&r.by_second));
    if let Some(m) = &r.machine {
        println!(
            "machine: {:.2} of {} cores busy, {:.1}% stolen by the hypervisor",
            m.busy_cores, m.cores, m.steal_percent
        );
        if !m.written_back_mb_by_second.is_empty() {
            // Read beside the slow seconds above: a burst of write-back stalls the commits.
            let seconds: Vec<String> = m.written_back_mb_by_second.iter().map(|mb| format!("{mb:.0}")).collect();
            println!(
                "written back to disk by the kernel, MB by second: {} ({:.0} MB in all)",
                seconds.join(" "),
                m.written_back_mb_by_second.iter().sum::<f64>()
            );
        }
    }
    if r.errors.is_empty() {
        println!("errors: none");
    } else {
        for (kind, n) in &r.errors {
            println!("errors: {n:>8}  {kind}");
        }
    }
    match check {
        Some(c) => println!(
            "checks: {} ({} events folded; read side settled in {} ms; unbalanced currencies {:?}; \
             negative user balances {}; read model mismatches {})",
            if c.passed() { "PASS" } else { "FAIL" },
            c.events,
            c.settle.as_millis(),
            c.unbalanced,
            c.negative_user_balances,
            c.read_model_mismatches
        ),
        None => println!("checks: skipped"),
    }
}

/// Each second's slow requests, with its slowest in brackets where it had
/// any: "0 0 3[41] 0 ...".
fn timeline(seconds: &[Second]) -> String {
    seconds
        .iter()
        .map(|s| if s.slow == 0 { "0".to_owned() } else { format!("{}[{}]", s.slow, s.max_micros / 1000) })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn append_json(path: &std::path::Path, r: &RunResult, check: Option<&CheckResult>) -> anyhow::Result<()> {
    let line = json!({
        "scenario": r.scenario.name(),
        "connections": r.connections,
        "rate": r.rate,
        "seconds": r.seconds,
        "requests": r.requests,
        "transfers": r.transfers,
        "requests_per_sec": r.requests as f64 / r.seconds,
        "transfers_per_sec": r.transfers as f64 / r.seconds,
        "latency_ms": { "p50": ms(&r.latency, 0.5), "p90": ms(&r.latency, 0.9), "p99": ms(&r.latency, 0.99),
                        "p999": ms(&r.latency, 0.999), "max": r.latency.max() as f64 / 1000.0 },
        "lag_ms": { "p50": ms(&r.lag, 0.5), "p99": ms(&r.lag, 0.99),
                    "p99_first_half": r.lag_p99_halves.0 as f64 / 1000.0,
                    "p99_second_half": r.lag_p99_halves.1 as f64 / 1000.0, "probes": r.lag.len(),
                    "failed": r.lag_failures },
        "errors": r.errors,
        "checks_passed": check.map(CheckResult::passed),
        "machine": r.machine.as_ref().map(|m| json!({
            "busy_cores": m.busy_cores,
            "cores": m.cores,
            "steal_percent": m.steal_percent,
            "written_back_mb_by_second": m.written_back_mb_by_second,
        })),
        "by_second": r.by_second.iter().map(|s| json!([s.requests, s.slow, s.max_micros / 1000])).collect::<Vec<_>>(),
    });
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(file, "{line}")?;
    Ok(())
}
