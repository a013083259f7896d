"""Benchmark: low-rank factorization beside channel pruning on the real ResNet-20 (../shared).

At params=0.7 and macs=0.6, without fine-tuning: the plan with pruning alone, with low-rank
factorization alone, with both, and the uniform plans (one pruning fraction for every group; one
rank for every layer), each applied for real and measured on the full CIFAR-10 JPEG test set
(10,000 images) and on the 7,500 of them that neither the scan's sample nor the BatchNorm
calibration used. Every number is measured in this run, predicted costs next to measured ones.

    python bench/bench_lowrank.py [--samples 2000] [--calib-samples 500] [--shared ../shared]

The plans are the solver's (no verification), so the table shows what each method family buys by
itself; `sensplan plan` verifies them by measurement on top of this.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _shared import ROOT, parser, resnet20_files  # bench/ is on sys.path when run as a script

BUDGETS = ("params=0.7", "macs=0.6")


def main() -> int:
    args = parser(__doc__).parse_args()
    files = resnet20_files(args.shared)
    if files is None:
        return 0
    weights, test_dir = files

    from sensplan.planner import Budget, apply_plan, load_compressed, make_plan, measure_original
    from sensplan.sensitivity import (
        DataSpec,
        ModelSpec,
        ScanConfig,
        evaluate,
        get_method,
        load_calibration_set,
        load_eval_set,
        load_model,
        scan,
    )

    torch.manual_seed(0)
    spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet20")
    model = load_model(spec, weights)
    data_spec = DataSpec.parse(str(test_dir))
    full = load_eval_set(data_spec, None, seed=0)
    data = load_eval_set(data_spec, args.samples, seed=0)
    calib = load_calibration_set(data, args.calib_samples, seed=0)
    held = load_eval_set(data_spec, None, seed=0, exclude=np.concatenate([data.indices, calib.indices]))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"scan sample {len(data)}, calibration {len(calib)}; measured on the full test set ({len(full)}) and "
          f"on the {len(held)} images outside the sample and calibration (held-out)")

    settings = {"prune": get_method("prune").default_settings, "lowrank": get_method("lowrank").default_settings}
    t = time.perf_counter()
    table = scan(model, data, ScanConfig(settings), calib=calib, model_spec=spec, weights=str(weights),
                 progress=False)
    scan_s = time.perf_counter() - t
    per_method = Counter(r["method"] for r in table.results)
    skipped = table.methods["lowrank"]["skipped"]
    print(f"scan: {len(table.results)} probes in {scan_s:.0f} s ("
          + ", ".join(f"{k} {v}" for k, v in per_method.items()) + f"); lowrank skipped {len(skipped)} layer(s)"
          + (f", e.g. {next(iter(skipped))}: {next(iter(skipped.values()))}" if skipped else ""))

    before = measure_original(model, full, spec, timing=False)
    base_held = evaluate(model, held).top1
    print(f"original: top-1 {before['score']:.4f} (full) / {base_held:.4f} (held-out), "
          f"{before['params'] / 1e3:.1f} k params, {before['macs'] / 1e6:.2f} M MACs, "
          f"{before['payload_bytes'] / 1e3:.1f} kB")

    tmp = tempfile.TemporaryDirectory()
    rows = []
    for budget in BUDGETS:
        plans = {"prune alone": make_plan(table.restricted(["prune"]), [Budget.parse(budget)]),
                 "lowrank alone": make_plan(table.restricted(["lowrank"]), [Budget.parse(budget)]),
                 "prune + lowrank": make_plan(table, [Budget.parse(budget)])}
        cases = [(name, plan, "planned") for name, plan in plans.items()]
        cases += [(f"uniform ({name.replace(' alone', '')})", plan, "uniform") for name, plan in plans.items()
                  if plan.data["plans"]["uniform"] is not None]
        for name, plan, variant in cases:
            out = Path(tmp.name) / budget / name.replace(" ", "_").replace("(", "").replace(")", "")
            t = time.perf_counter()
            m = apply_plan(model, plan, full, out, variant=variant, calib=calib, model_spec=spec, timing=False,
                           before=before)
            held_top1 = evaluate(load_compressed(out / "model.sensplan", load_model(spec)), held).top1
            rows.append((budget, name, plan.data["plans"][variant], m, held_top1, time.perf_counter() - t))

    print(f"\n{'budget':<11} {'allocation':<26} {'pred drop':>9} {'top-1':>7} {'held':>7} {'params':>7} "
          f"{'MACs':>6} {'size':>6}   measured / predicted (params, MACs, BOPs, size)   allocation")
    for budget, name, alloc, m, held_top1, _s in rows:
        a, c = m["after"], m["comparison"]
        ratios = ", ".join(f"{c[k]['ratio']:.4f}" for k in ("params", "macs", "bops", "size"))
        print(f"{budget:<11} {name:<26} {alloc['predicted']['drop']:>9.4f} {a['score']:>7.4f} {held_top1:>7.4f} "
              f"{a['params'] / before['params']:>7.3f} {a['macs'] / before['macs']:>6.3f} "
              f"{a['payload_bytes'] / before['payload_bytes']:>6.3f}   {ratios:<46} {_summary(alloc)}")
    exact = all(m["comparison"][k]["measured"] == m["comparison"][k]["predicted"]
                for *_, m, _h, _s in rows for k in ("params", "macs", "bops"))
    size_gap = [m["comparison"]["size"]["measured"] - m["comparison"]["size"]["predicted"] for *_, m, _h, _s in rows]
    print(f"params, MACs and BOPs measured == predicted in every row: {exact}; size measured - predicted: "
          f"{min(size_gap):.0f} .. {max(size_gap):.0f} bytes (whole bytes per packed part)")
    print("\nplanned minus the best uniform plan at the same budget (held-out top-1, points):")
    for budget in BUDGETS:
        got = {name: h for b, name, _a, _m, h, _s in rows if b == budget}
        best_uniform = max((v for k, v in got.items() if k.startswith("uniform")), default=float("nan"))
        print(f"  {budget}: " + ", ".join(f"{k} {100 * (got[k] - best_uniform):+.2f}"
                                          for k in ("prune alone", "lowrank alone", "prune + lowrank")))
    tmp.cleanup()
    return 0


def _summary(alloc: dict) -> str:
    """What the allocation applies: the methods' settings, counted."""
    labels = Counter(c["label"].split(" (")[0] for c in alloc["choices"].values() if c["method"])
    return ", ".join(f"{k} x{n}" for k, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


if __name__ == "__main__":
    sys.exit(main())
