"""Benchmark of the self-checking planner on the real CIFAR ResNets (../shared), no fine-tuning.

For each model the full CIFAR-10 JPEG test set (10,000 images) is split, stratified and seeded, into
the scan's sample (2,000), BatchNorm calibration (500), the verification's held-out split (2,500)
and a final test split (5,000) that nothing in planning saw. For each budget it prints, all
measured in this run:

- the plan without verification (the solver's additive prediction) and the verified plan: the
  predicted and measured drop per verification round, and which candidate won;
- top-1 on the test split of: the verified plan, the unverified plan, the uniform plan chosen by
  prediction, and the best uniform candidate in hindsight (every uniform candidate measured on the
  test split);
- planning time, verification included.

At the end: how often the verified plan is below the best uniform plan by more than the noise, and
the mean absolute error of the final prediction (the verified plan's expected drop) against the
test split, over plans whose expected drop is at most 2 points.

    python bench/bench_verify.py [--models resnet20,resnet56] [--budgets macs=0.9,...] [--cache DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = "macs=0.9,macs=0.7,macs=0.5,size=0.25,size=0.156,size=0.125,size=0.1"
NOISE = 0.002  # 0.2 points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", help="keep each model's scan (and its journal) here and reuse it")
    args = ap.parse_args()
    shared = Path(args.shared)
    test_dir = shared / "data" / "cifar10-jpg" / "test"
    if not test_dir.is_dir():
        print(f"skipped: {shared} has no CIFAR-10 JPEG test set")
        return 0

    from sensplan.planner import Budget, Verifier, make_plan
    from sensplan.sensitivity import DataSpec, ModelSpec, ScanConfig, load_eval_set, load_model, scan
    from sensplan.sensitivity._data import load_calibration_set

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    spec_data = DataSpec.parse(str(test_dir))
    sample = load_eval_set(spec_data, 2000, seed=0)
    calib = load_calibration_set(sample, 500, seed=0)
    used = np.concatenate([sample.indices, calib.indices])
    held = load_eval_set(spec_data, 2500, seed=2, exclude=used)
    test = load_eval_set(spec_data, None, seed=3, exclude=np.concatenate([used, held.indices]))
    print(f"splits: sample {len(sample)}, calibration {len(calib)}, held-out {len(held)}, test {len(test)}")
    summary = []
    for name in args.models.split(","):
        weights = shared / "models" / "cifar10" / f"{name}_jpeg.pt"
        if not weights.is_file():
            print(f"\n{name}: skipped, no {weights}")
            continue
        spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:{name}")
        model = load_model(spec, weights)
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
        for text in args.budgets.split(","):
            budget = [Budget.parse(text)]
            t = time.perf_counter()
            plain = make_plan(table, budget)
            plain_s = time.perf_counter() - t
            t = time.perf_counter()
            plan = make_plan(table, budget, verifier=verifier, rounds=args.rounds)
            plan_s = time.perf_counter() - t
            ver = plan.data["verification"]
            print(f"\n{name} {text}: planning {plain_s:.1f} s without verification, {plan_s:.0f} s with "
                  f"({ver['uniform_seconds']:.0f} s of it measuring {len(ver['uniform'])} uniform candidates)")
            for r in ver["rounds"]:
                if "sample" not in r:
                    print(f"  round {r['round']}: {r['stopped']}")
                    continue
                lo, hi = r["predicted"]["drop_interval"]
                print(f"  round {r['round']}: predicted drop {100 * r['predicted']['drop']:5.2f} pt "
                      f"[{100 * lo:5.2f}, {100 * hi:5.2f}], measured {100 * r['sample']['drop']:5.2f} (sample) "
                      f"{100 * r['held_out']['drop']:5.2f} (held-out)"
                      + ("" if r["within_interval"] else "  -> corrected, solved again" if "correction" in r
                         else "  (outside the interval; no rounds left)"))
            print(f"  verdict: {ver['verdict']}")

            def test_top1(alloc: dict, judge: Verifier = judge, data: dict = plan.data) -> float:
                _, m = judge.measure(data, alloc, held=True, sample=False)
                return m.score if m is not None else float("nan")

            final = test_top1(plan.variant("planned"))
            unverified = test_top1(plain.variant("planned"))
            uni_pred = plain.data["plans"]["uniform"]
            by_pred = test_top1(uni_pred) if uni_pred else float("nan")
            from sensplan.planner import Costs, uniform_candidates
            from sensplan.planner._plan import uniform_allocation
            from sensplan.planner._solver import uniform_label

            cm = Costs(table)
            hindsight, best_label = float("nan"), "-"
            for u in uniform_candidates(cm, budget):
                s = test_top1(uniform_allocation(cm, u, table))
                if not s <= hindsight:
                    hindsight, best_label = s, uniform_label(cm, u)
            expected = plan.variant("planned")["expected"]["drop"]
            measured_drop = base["held"] - final
            print(f"  test top-1: verified plan {final:.4f} | unverified plan {unverified:.4f} | uniform by "
                  f"prediction {by_pred:.4f} | best uniform in hindsight {hindsight:.4f} ({best_label})")
            print(f"  verified - best uniform {100 * (final - hindsight):+.2f} pt; - uniform by prediction "
                  f"{100 * (final - by_pred):+.2f} pt; unverified - best uniform "
                  f"{100 * (unverified - hindsight):+.2f} pt")
            first = ver["rounds"][0]
            print(f"  drop on test: final prediction {100 * expected:.2f} pt, measured {100 * measured_drop:.2f} pt; "
                  f"round-1 additive prediction {100 * first['predicted']['drop']:.2f} pt, unverified measured "
                  f"{100 * (base['held'] - unverified):.2f} pt")
            summary.append({"model": name, "budget": text, "final": final, "hindsight": hindsight,
                            "by_pred": by_pred, "unverified": unverified, "expected": expected,
                            "measured": measured_drop, "additive": first["predicted"]["drop"],
                            "unverified_drop": base["held"] - unverified, "seconds": plan_s})
    if not summary:
        return 0
    print("\n== summary (test split, no fine-tuning) ==")
    print(f"{'model':<9} {'budget':<11} {'verified':>9} {'unverif.':>9} {'uni-pred':>9} {'uni-best':>9} "
          f"{'v-best':>7} {'pred':>6} {'meas':>6} {'plan s':>7}")
    for s in summary:
        print(f"{s['model']:<9} {s['budget']:<11} {s['final']:>9.4f} {s['unverified']:>9.4f} {s['by_pred']:>9.4f} "
              f"{s['hindsight']:>9.4f} {100 * (s['final'] - s['hindsight']):>+7.2f} {100 * s['expected']:>6.2f} "
              f"{100 * s['measured']:>6.2f} {s['seconds']:>7.0f}")
    below = [s for s in summary if s["final"] < s["hindsight"] - NOISE]
    small = [s for s in summary if s["expected"] <= 0.02]
    mae = statistics.mean(abs(s["expected"] - s["measured"]) for s in small) if small else float("nan")
    small_add = [s for s in summary if s["additive"] <= 0.02]
    mae_add = (statistics.mean(abs(s["additive"] - s["unverified_drop"]) for s in small_add)
               if small_add else float("nan"))
    print(f"verified plan below the best uniform by more than {100 * NOISE:.1f} pt: {len(below)} of "
          f"{len(summary)}" + (": " + ", ".join(f"{s['model']} {s['budget']}" for s in below) if below else ""))
    print(f"mean |final prediction - test drop| over {len(small)} plans predicted <= 2 pt: {100 * mae:.2f} pt "
          f"(the unverified additive prediction: {100 * mae_add:.2f} pt over {len(small_add)})")
    print(f"median planning time with verification: {statistics.median(s['seconds'] for s in summary):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
