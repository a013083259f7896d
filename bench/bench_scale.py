"""Benchmark of scan and verification speed on the real CIFAR ResNets (../shared), each against a
baseline measured in the same run.

The CIFAR-10 JPEG test set (10,000 images) is split, stratified and seeded, into the scan's sample
(2,000), BatchNorm calibration (500), the verification's held-out split (2,500) and the rest. Per
model it prints:

- **the naive loop**: one evaluation of the original on all 10,000 images (median of 3), times the
  probe count: what a scan that evaluates every probe on the full set in full costs; and, where the
  model runs faster on channels-last inputs (which the scan then uses), the same loop on those;
- **the default scan** on the sample with the prefix cache (each probe runs from the first layer it
  changes) and, for the models in ``--uncached``, the same scan with ``cache_mb=0``: wall times,
  speed-ups, and whether every row is bit-identical;
- **Spearman** of the sample scan's drops and KL divergences against the same probes on all 10,000
  images (a second, cached scan), over all probes and per method;
- **verification**: per budget, planning time with one verifier for all budgets (candidates measured
  once, uniform candidates raced) against a fresh verifier per budget with no race (the slow path),
  and whether both kept the same winner;
- **workers**: the default scan with ``workers=2`` (local processes) and on a local 2-worker Ray
  cluster (when Ray is installed) against one process, and whether the tables are identical.

    python bench/bench_scale.py [--models resnet20,resnet56] [--uncached resnet20] [--budgets ...]
        [--parts speed,spearman,verify,workers]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ROOT, cifar_resnets, cifar_splits, cifar_test_dir  # noqa: E402

BUDGETS = "size=0.156,size=0.125,size=0.1,size=0.078,macs=0.7,macs=0.5"
COMPARED = ("score", "loss", "drop", "drop_se", "lost", "gained", "loss_increase", "signals")


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--uncached", default="resnet20", help="models whose scan also runs with the cache off")
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--parts", default="speed,spearman,verify,workers")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    test_dir = cifar_test_dir(args.shared)
    if test_dir is None:
        return 0
    from sensplan.sensitivity import DataSpec, load_eval_set

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sample, calib, held, _ = cifar_splits(test_dir)
    everything = load_eval_set(DataSpec.parse(str(test_dir)), None, seed=0)
    print(f"full set: {len(everything)} images")
    for name, _, spec, model in cifar_resnets(args.shared, args.models):
        print(f"\n== {name} ==")
        table = _scan_speed(name, model, sample, calib, everything, name in args.uncached.split(","),
                            "speed" in parts)
        if "spearman" in parts:
            _spearman(model, table, everything, calib)
        if "verify" in parts:
            _verification(model, spec, table, sample, calib, held, args.budgets)
        if "workers" in parts:
            _workers(model, spec, table, sample, calib)
    return 0


def _workers(model, spec, table, sample, calib) -> None:
    import importlib.util

    from sensplan.sensitivity import ScanConfig, scan

    one = table.data["provenance"]["seconds"]
    print(f"workers (against one process: {one:.1f} s):")
    for label, kw in [("--workers 2", {"workers": 2}), ("--ray, 2 workers", {"workers": 2, "ray": ""})]:
        if "ray" in kw and importlib.util.find_spec("ray") is None:
            print(f"  {label}: skipped, Ray is not installed")
            continue
        t = time.perf_counter()
        spread = scan(model, sample, ScanConfig(), calib=calib, model_spec=spec, progress=False, **kw)
        s = time.perf_counter() - t
        print(f"  {label}: {s:.1f} s = {one / s:.2f}x one process; {_agreement(table, spread)}")


def _agreement(a, b) -> str:
    """How two scans' rows agree: bit-identical, else how many have the same top-1 flips and the
    largest difference of a loss increase (a channels-last scan on another thread count rounds
    apart: see sensitivity/_eval.channels_last_wins)."""
    pairs = list(zip(a.results, b.results, strict=True))
    same = sum(all(x.get(k) == y.get(k) for k in COMPARED) for x, y in pairs)
    text = f"rows bit-identical: {same} of {len(pairs)}"
    if same < len(pairs):
        flips = sum(all(x.get(k) == y.get(k) for k in ("drop", "lost", "gained")) for x, y in pairs)
        worst = max(abs(float(x["loss_increase"]) - float(y["loss_increase"])) for x, y in pairs)
        text += f"; the same top-1 drop: {flips}; largest loss-increase difference {worst:.2g} nats"
    return text


def _scan_speed(name, model, sample, calib, everything, uncached: bool, naive_too: bool = True):
    from sensplan.sensitivity import ScanConfig, get_task, scan

    if not naive_too:
        return scan(model, sample, ScanConfig(), calib=calib, progress=False)
    from sensplan.sensitivity import channels_last_wins

    task = get_task("classification")
    state = task.prepare(model.eval(), everything)

    def one_evaluation(data) -> float:
        """One evaluation of the original on ``data``, median of 3 (s)."""
        times = []
        for _ in range(3):
            t = time.perf_counter()
            task.evaluate(model, data, state)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    naive_probe = one_evaluation(everything)
    # the same loop on channels-last inputs, where the model runs faster on them (as the scan does)
    naive_cl = one_evaluation(everything.in_layout(True)) if channels_last_wins(model, everything.x) else None
    t = time.perf_counter()
    table = scan(model, sample, ScanConfig(), calib=calib, progress=False)
    cached_s = time.perf_counter() - t
    n = len(table.results)
    naive = naive_probe * n
    record = table.data["provenance"]["prefix_cache"]
    print(f"naive loop: {naive_probe:.2f} s per probe (10,000 images, median of 3) x {n} probes = {naive:.0f} s")
    print(f"default scan, prefix cache: {cached_s:.1f} s = {naive / cached_s:.1f}x faster than the naive loop "
          f"({record}; inputs {table.data['provenance'].get('input_layout')})")
    if naive_cl is not None:
        print(f"naive loop on channels-last inputs: {naive_cl:.2f} s per probe x {n} = {naive_cl * n:.0f} s; the scan "
              f"is {naive_cl * n / cached_s:.1f}x faster than that")
    if uncached:
        t = time.perf_counter()
        plain = scan(model, sample, ScanConfig(cache_mb=0), calib=calib, progress=False)
        plain_s = time.perf_counter() - t
        print(f"default scan, cache off: {plain_s:.1f} s = {naive / plain_s:.1f}x faster than the naive loop; "
              f"the cache is {plain_s / cached_s:.2f}x faster; {_agreement(table, plain)}")
    return table


def _spearman(model, table, everything, calib) -> None:
    from scipy.stats import spearmanr

    from sensplan.sensitivity import ScanConfig, scan

    t = time.perf_counter()
    full = scan(model, everything, ScanConfig(), calib=calib, progress=False)
    print(f"the same probes on all {len(everything)} images (cached scan): {time.perf_counter() - t:.0f} s")
    ref = {(r["unit"], r["method"], str(r["setting"])): r for r in full.results}
    for method in [None, *sorted({r["method"] for r in table.results})]:
        rows = [r for r in table.results if method is None or r["method"] == method]
        parts = []
        for signal in ("drop", "kl"):
            a = [_value(r, signal) for r in rows]
            b = [_value(ref[(r["unit"], r["method"], str(r["setting"]))], signal) for r in rows]
            parts.append(f"{signal} {spearmanr(a, b).statistic:.3f}")
        print(f"  Spearman, sample scan against the full set ({method or 'all probes'}, {len(rows)}): "
              + ", ".join(parts))


def _value(row, signal: str) -> float:
    return float(row["drop"]) if signal == "drop" else float(row["signals"][signal]["value"])


def _verification(model, spec, table, sample, calib, held, budgets: str) -> None:
    import sensplan.planner._verify as verify_mod
    from sensplan.planner import Budget, Verifier, make_plan

    shared = Verifier(model, sample, calib, held, model_spec=spec)
    fast, slow = [], []
    print("verification (seconds per budget; the winner):")
    for text in budgets.split(","):
        budget = [Budget.parse(text)]
        t = time.perf_counter()
        a = make_plan(table, budget, verifier=shared)
        fast.append(time.perf_counter() - t)
        z = verify_mod.RACE_Z
        verify_mod.RACE_Z = float("inf")
        try:
            t = time.perf_counter()
            b = make_plan(table, budget, verifier=Verifier(model, sample, calib, held, model_spec=spec))
            slow.append(time.perf_counter() - t)
        finally:
            verify_mod.RACE_Z = z
        va, vb = a.data["verification"], b.data["verification"]
        same = va["winner"] == vb["winner"] and a.variant()["choices"] == b.variant()["choices"]
        print(f"  {text:<11} {fast[-1]:5.1f} s (measured {va['measurements']}) against {slow[-1]:5.1f} s; "
              f"same winner: {same} ({va['winner']['name']})")
    print(f"  median per budget: {statistics.median(fast):.1f} s against {statistics.median(slow):.1f} s "
          f"({statistics.median(slow) / statistics.median(fast):.2f}x)")
    # planning again in a new process (`sensplan plan` once more): a fresh verifier that reads the
    # measurements the first one kept in its memo file, against the same fresh verifier without one
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        memo = Path(tmp) / "scan.json.verified"
        first = Verifier(model, sample, calib, held, model_spec=spec, memo=memo)
        for text in budgets.split(","):
            make_plan(table, [Budget.parse(text)], verifier=first)
        first.close()
        again, same = [], 0
        for text in budgets.split(","):
            t = time.perf_counter()
            fresh = Verifier(model, sample, calib, held, model_spec=spec, memo=memo)
            b = make_plan(table, [Budget.parse(text)], verifier=fresh)
            fresh.close()
            again.append(time.perf_counter() - t)
            a = make_plan(table, [Budget.parse(text)], verifier=shared)  # the first run's, from its own memo
            same += a.variant()["choices"] == b.variant()["choices"]
        print(f"  planning again with a fresh verifier and the memo file: median {statistics.median(again):.1f} s "
              f"per budget (a fresh verifier included), against {statistics.median(fast):.1f} s the first time; "
              f"same plan at {same} of {len(again)} budgets")


if __name__ == "__main__":
    sys.exit(main())
