"""Benchmark of the self-checking planner on the real CIFAR ResNets (../shared), no fine-tuning.

For each model the full CIFAR-10 JPEG test set (10,000 images) is split, stratified and seeded, into
the scan's sample (2,000), BatchNorm calibration (500), the verification's held-out split (2,500)
and a final test split (5,000) that nothing in planning saw. For each budget and each planning
signal (``--signals``, default kl then drop: the default signal and the top-1 drop it replaced) it
prints, all measured in this run:

- the plan without verification (the solver's prediction) and the verified plan: the predicted and
  measured drop per verification round, and which candidate won;
- top-1 on the test split of: the verified plan, the unverified plan, the uniform plan chosen by
  prediction, and the best uniform candidate in hindsight (every uniform candidate measured on the
  test split);
- planning time, verification included.

At the end, per signal: how often the verified plan is below the best uniform plan by more than the
noise, its margins at the size budgets, and the mean absolute error of the final prediction (the
verified plan's expected drop) against the test split, over plans whose expected drop is at most 2
points. Spearman correlations of the signals and ``--fast`` are in bench_signals.py.

    python bench/bench_verify.py [--models resnet20,resnet56] [--budgets macs=0.7,...] [--signals kl,drop]
        [--cache DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ROOT, best_uniform, cifar_resnets, cifar_splits, cifar_test_dir  # noqa: E402

BUDGETS = "size=0.156,size=0.125,size=0.1,size=0.078,macs=0.7,macs=0.5"
NOISE = 0.002  # 0.2 points
#: the issue's targets: the verified plan above the best uniform plan by at least this (points)
TARGETS = {"size=0.1": 1.0, "size=0.078": 1.0, "size=0.125": 0.3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--signals", default="kl,drop")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", help="keep each model's scan (and its journal) here and reuse it")
    args = ap.parse_args()
    test_dir = cifar_test_dir(args.shared)
    if test_dir is None:
        return 0

    from sensplan.planner import Budget, Verifier, make_plan
    from sensplan.sensitivity import ScanConfig, scan

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sample, calib, held, test = cifar_splits(test_dir)
    summary = []
    for name, weights, spec, model in cifar_resnets(args.shared, args.models):
        cache = Path(args.cache) if args.cache else None
        t = time.perf_counter()
        journal = (cache / f"{name}.scan.json.journal") if cache else None
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
        table = scan(model, sample, ScanConfig(), calib=calib, model_spec=spec, weights=str(weights),
                     progress=False, journal=journal)
        print(f"\n== {name}: scan {len(table.results)} probes in {time.perf_counter() - t:.0f} s "
              f"({table.data['provenance'].get('probes_from_journal', 0)} from the journal) ==")
        verifier = Verifier(model, sample, calib, held, model_spec=spec)
        judge = Verifier(model, sample, calib, test, model_spec=spec)  # measures on the test split
        base = judge.baseline("classification")
        print(f"original top-1: sample {base['sample']:.4f}, test {base['held']:.4f}")

        def test_top1(alloc: dict, data: dict, judge: Verifier = judge) -> float:
            _, m = judge.measure(data, alloc, held=True, sample=False)
            return m.score if m is not None else float("nan")

        for text in args.budgets.split(","):
            budget = [Budget.parse(text)]
            hindsight, best_label = best_uniform(judge, table, budget, make_plan(table, budget, signal="drop").data)
            print(f"\n{name} {text}: best uniform in hindsight {hindsight:.4f} ({best_label})")
            for signal in args.signals.split(","):
                summary.append(_one(name, text, signal, table, budget, verifier, test_top1, base, hindsight,
                                    args.rounds, make_plan))
    if summary:
        _summary(summary, args.signals.split(","))
    return 0


def _one(name: str, text: str, signal: str, table, budget, verifier, test_top1, base, hindsight, rounds,
         make_plan) -> dict:
    """Plan one budget on one signal, with and without verification; measure both on the test split."""
    t = time.perf_counter()
    plain = make_plan(table, budget, signal=signal)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(table, budget, verifier=verifier, rounds=rounds, signal=signal)
    plan_s = time.perf_counter() - t
    ver = plan.data["verification"]
    print(f"  [{signal}] planning {plain_s:.1f} s without verification, {plan_s:.0f} s with "
          f"({ver['uniform_seconds']:.0f} s of it measuring {len(ver['uniform'])} uniform candidates)")
    for r in ver["rounds"]:
        if "sample" not in r:
            print(f"    round {r['round']}: {r['stopped']}")
            continue
        lo, hi = r["predicted"]["drop_interval"]
        print(f"    round {r['round']}: predicted drop {100 * r['predicted']['drop']:5.2f} pt "
              f"[{100 * lo:5.2f}, {100 * hi:5.2f}], measured {100 * r['sample']['drop']:5.2f} (sample) "
              f"{100 * r['held_out']['drop']:5.2f} (held-out)"
              + ("" if r["within_interval"] else "  -> corrected, solved again" if "correction" in r
                 else "  (outside the interval; no rounds left)"))
    print(f"    verdict: {ver['verdict']}")
    final = test_top1(plan.variant("planned"), plan.data)
    unverified = test_top1(plain.variant("planned"), plain.data)
    uni_pred = plain.data["plans"]["uniform"]
    by_pred = test_top1(uni_pred, plain.data) if uni_pred else float("nan")
    expected = plan.variant("planned")["expected"]["drop"]
    measured_drop = base["held"] - final
    print(f"    test top-1: verified plan {final:.4f} | unverified plan {unverified:.4f} | uniform by prediction "
          f"{by_pred:.4f} | best uniform in hindsight {hindsight:.4f}")
    print(f"    verified - best uniform {100 * (final - hindsight):+.2f} pt; unverified - best uniform "
          f"{100 * (unverified - hindsight):+.2f} pt; expected drop {100 * expected:.2f} pt, test drop "
          f"{100 * measured_drop:.2f} pt")
    return {"model": name, "budget": text, "signal": signal, "final": final, "hindsight": hindsight,
            "by_pred": by_pred, "unverified": unverified, "expected": expected, "measured": measured_drop,
            "seconds": plan_s}


def _summary(summary: list[dict], signals: list[str]) -> None:
    print("\n== summary (test split, no fine-tuning) ==")
    print(f"{'model':<9} {'budget':<11} {'signal':<7} {'verified':>9} {'unverif.':>9} {'uni-pred':>9} "
          f"{'uni-best':>9} {'v-best':>7} {'expect':>7} {'test':>6} {'plan s':>7}")
    for s in summary:
        print(f"{s['model']:<9} {s['budget']:<11} {s['signal']:<7} {s['final']:>9.4f} {s['unverified']:>9.4f} "
              f"{s['by_pred']:>9.4f} {s['hindsight']:>9.4f} {100 * (s['final'] - s['hindsight']):>+7.2f} "
              f"{100 * s['expected']:>7.2f} {100 * s['measured']:>6.2f} {s['seconds']:>7.0f}")
    for signal in signals:
        rows = [s for s in summary if s["signal"] == signal]
        below = [s for s in rows if s["final"] < s["hindsight"] - NOISE]
        small = [s for s in rows if s["expected"] <= 0.02]
        mae = statistics.mean(abs(s["expected"] - s["measured"]) for s in small) if small else float("nan")
        missed = [f"{s['model']} {s['budget']} {100 * (s['final'] - s['hindsight']):+.2f}" for s in rows
                  if s["budget"] in TARGETS and 100 * (s["final"] - s["hindsight"]) < TARGETS[s["budget"]]]
        print(f"[{signal}] below the best uniform by more than {100 * NOISE:.1f} pt: {len(below)} of {len(rows)}"
              + (" (" + ", ".join(f"{s['model']} {s['budget']}" for s in below) + ")" if below else "")
              + f"; size targets (+1 pt at 0.1 and 0.078, +0.3 at 0.125) missed: {len(missed)}"
              + (" (" + ", ".join(missed) + ")" if missed else "")
              + f"; mean |expected - test drop| over {len(small)} plans expected <= 2 pt: {100 * mae:.2f} pt; "
              f"median planning time {statistics.median(s['seconds'] for s in rows):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
