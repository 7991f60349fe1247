"""The results table of a bench/run.sh output directory: medians over its
runs, and each scenario's transfers/s over the pgbench baseline's.

    python3 bench/table.py target/bench/<run>
"""
import glob
import json
import statistics
import sys

out = sys.argv[1]
base = [json.loads(line) for line in open(f"{out}/baseline.jsonl")]
single = statistics.median(b["baseline_single_tps"] for b in base)
batched = statistics.median(b["baseline_batch_transfers_per_sec"] for b in base)
rows = {}
for path in sorted(glob.glob(f"{out}/results-*.jsonl")) + sorted(glob.glob(f"{out}/unpaced-*.jsonl")):
    for line in open(path):
        r = json.loads(line)
        # The fixed-rate rerun's rate differs per run: one row for all of them.
        name = r["scenario"] + ("" if r["rate"] is None else " @50% peak")
        # `batch` again on a server whose bulk writes the read side does not pace.
        if "/unpaced-" in path:
            name += " (unpaced)"
        rows.setdefault(name, []).append(r)


def median(rs, f):
    return statistics.median(f(r) for r in rs)


uniform = median(rows["uniform"], lambda r: r["transfers_per_sec"]) if "uniform" in rows else 0
print(f"median of {len(base)} run(s); baseline: {single:.0f} transfers/s one per transaction, "
      f"{batched:.0f} transfers/s 100 per transaction\n")
print("| scenario | req/s | transfers/s | vs pgbench | p50 ms | p90 ms | p99 ms | p99.9 ms "
      "| lag p50 ms | lag p99 ms | lag p99 1st/2nd half | errors | checks | steal % | write-back MB/s max |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, rs in rows.items():
    tps = median(rs, lambda r: r["transfers_per_sec"])
    ref = batched if name.startswith("batch") else single
    ratio = f"{tps / ref:.2f}x" if ref else "-"
    if name == "hot" and uniform:
        ratio += f" ({tps / uniform:.2f}x uniform)"
    errors = {}
    for r in rs:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    checks = "PASS" if all(r["checks_passed"] in (True, None) for r in rs) else "FAIL"
    lat = lambda q: median(rs, lambda r: r["latency_ms"][q])
    # Runs whose probes all failed have no lag figure (0 in the JSON): left out.
    lagged = [r for r in rs if r["lag_ms"]["probes"]] or rs
    lag = lambda q: median(lagged, lambda r: r["lag_ms"][q])
    halves = f"{lag('p99_first_half'):.0f} / {lag('p99_second_half'):.0f}"
    # No probe answered in time (a read side far behind): no lag figure, not 0.
    answered = sum(r["lag_ms"]["probes"] for r in rs)
    lag50, lag99 = (f"{lag('p50'):.0f}", f"{lag('p99'):.0f}") if answered else ("—", "—")
    if not answered:
        halves = "—"
    failed = sum(r["lag_ms"]["failed"] for r in rs)
    if failed:
        halves += f" ({failed} probes past 5 s)"
    # Time the hypervisor gave to others while measuring: each run's, in run order.
    steal = " / ".join(f"{r['machine']['steal_percent']:.0f}" if r.get("machine") else "-" for r in rs)
    # The kernel's largest second of write-back while measuring, each run's: a
    # burst stalls commits behind it (older results have no such figure).
    burst = " / ".join(f"{max(w):.0f}" if (w := (r.get("machine") or {}).get("written_back_mb_by_second")) else "-"
                       for r in rs)
    print(f"| {name} | {median(rs, lambda r: r['requests_per_sec']):.0f} | {tps:.0f} | {ratio} "
          f"| {lat('p50'):.1f} | {lat('p90'):.1f} | {lat('p99'):.1f} | {lat('p999'):.1f} "
          f"| {lag50} | {lag99} | {halves} | {sum(errors.values()) or 'none'} | {checks} | {steal} | {burst} |")
