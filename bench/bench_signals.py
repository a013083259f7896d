"""Benchmark of the planning signals and of ``scan --fast`` on the real CIFAR ResNet-20 (../shared).

The CIFAR-10 JPEG test set (10,000 images) is split, stratified and seeded, into the scan's sample
(2,000), BatchNorm calibration (500), a held-out split no plan here uses (2,500) and a test split
(5,000) that no choice saw. All measured in this run, it prints:

- the scan (default methods and settings) on the sample, and the same scan on the test split: the
  "full-set" values every signal is judged against;
- ``scan --fast`` on the sample: its time and how many probes it measured;
- per method, the Spearman rank correlation of each signal on the sample (drop, loss, kl, margin)
  and of the fast scan's Fisher estimate with the test split's drops and loss increases;
- per budget, without verification (so the signal alone decides): the test top-1 of the plan made
  on each signal, its predicted drop, and the best uniform plan in hindsight (every uniform candidate
  measured on the test split); plan minus best uniform, in points.

    python bench/bench_signals.py [--budgets size=0.125,...] [--cache DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import best_uniform, resnet20_bench  # noqa: E402

BUDGETS = "size=0.156,size=0.125,size=0.1,size=0.078,bops=0.03,bops=0.015,macs=0.7,macs=0.5"
SIGNALS = ("drop", "loss", "kl", "margin")


def _key(r: dict) -> tuple[str, str, str]:
    return r["unit"], r["method"], json.dumps(r["setting"], sort_keys=True)


def _value(r: dict, signal: str) -> float:
    return float(r["drop"]) if signal == "drop" else float(r["signals"][signal]["value"])


def main() -> int:
    setup = resnet20_bench(__doc__, BUDGETS)
    if setup is None:
        return 0
    args, weights, spec, model, (sample, calib, held, test) = setup

    from sensplan.planner import Budget, Verifier, make_plan
    from sensplan.sensitivity import ScanConfig, scan

    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def timed_scan(data, name: str, **cfg):
        t = time.perf_counter()
        table = scan(model, data, ScanConfig(**cfg), calib=calib, model_spec=spec, weights=str(weights),
                     progress=False, journal=(cache / f"{name}.journal") if cache else None)
        seconds = time.perf_counter() - t
        print(f"scan {name}: {len(table.results)} probes in {seconds:.1f} s "
              f"({table.data['provenance'].get('probes_from_journal', 0)} from the journal)")
        return table, seconds

    table, _ = timed_scan(sample, "sample")
    full, _ = timed_scan(test, "test-split")
    fast, fast_s = timed_scan(sample, "fast", fast=True)
    n_est = sum(1 for r in fast.results if r.get("estimated"))
    print(f"--fast: {fast_s:.1f} s, {n_est} probes estimated, {len(fast.results) - n_est} measured")

    truth = {_key(r): r for r in full.results}
    print("\n== Spearman against the test split (full-set) values of the same probes ==")
    print(f"{'method':<13} {'against':<14} " + " ".join(f"{s:>7}" for s in (*SIGNALS, "fisher")))
    for method in dict.fromkeys(r["method"] for r in table.results):
        rows = [r for r in table.results if r["method"] == method]
        fast_rows = {_key(r): r for r in fast.results if r["method"] == method}
        for against in ("drop", "loss_increase"):
            ref = [float(truth[_key(r)][against]) for r in rows]
            rho = [spearmanr([_value(r, s) for r in rows], ref)[0] for s in SIGNALS]
            rho.append(spearmanr([_value(fast_rows[_key(r)], "fisher") for r in rows], ref)[0])
            print(f"{method:<13} {against:<14} " + " ".join(f"{x:>7.3f}" for x in rho))

    judge = Verifier(model, sample, calib, test, model_spec=spec)  # measures on the test split
    base = judge.baseline("classification")
    print(f"\noriginal top-1: sample {base['sample']:.4f}, test {base['held']:.4f}")
    summary = []
    for text in args.budgets.split(","):
        budget = [Budget.parse(text)]
        best, best_label = best_uniform(judge, table, budget, make_plan(table, budget, signal="drop").data)

        def test_top1(alloc: dict, data: dict) -> float:
            _, m = judge.measure(data, alloc, held=True, sample=False)
            return m.score if m is not None else float("nan")

        print(f"\n{text}: best uniform in hindsight {best:.4f} ({best_label})")
        row = {"budget": text, "uniform": best}
        for signal, source in [*((s, table) for s in SIGNALS), ("fisher", fast)]:
            t = time.perf_counter()
            plan = make_plan(source, budget, signal=signal)
            seconds = time.perf_counter() - t
            planned = plan.variant("planned")
            top1 = test_top1(planned, plan.data)
            predicted = planned["predicted"]["drop"]
            row[signal] = top1
            row[f"{signal}_pred"] = predicted
            print(f"  {signal:<7}{' (fast)' if source is fast else '       '} test top-1 {top1:.4f} "
                  f"({100 * (top1 - best):+6.2f} pt vs best uniform), predicted drop {100 * predicted:6.2f} pt, "
                  f"measured {100 * (base['held'] - top1):6.2f} pt, solved in {seconds:.1f} s")
        summary.append(row)
    print("\n== summary: plan minus best uniform in hindsight, test split, points (no verification) ==")
    names = (*SIGNALS, "fisher")
    print(f"{'budget':<12} {'uniform':>8} " + " ".join(f"{s:>7}" for s in names))
    for row in summary:
        print(f"{row['budget']:<12} {row['uniform']:>8.4f} "
              + " ".join(f"{100 * (row[s] - row['uniform']):>+7.2f}" for s in names))
    for s in names:
        small = [(row[f"{s}_pred"], base["held"] - row[s]) for row in summary if row[f"{s}_pred"] <= 0.02]
        mae = statistics.mean(abs(p - m) for p, m in small) if small else float("nan")
        wins = sum(1 for row in summary if row[s] > row["uniform"])
        print(f"{s:<7} beats best uniform at {wins} of {len(summary)} budgets; median plan - uniform "
              f"{100 * statistics.median(row[s] - row['uniform'] for row in summary):+.2f} pt; mean |predicted - "
              f"measured| over {len(small)} plans predicted <= 2 pt: {100 * mae:.2f} pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
