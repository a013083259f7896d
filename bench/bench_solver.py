"""Benchmark of the exact allocation (the MILP): instance sizes and solve times, against the
formulation it replaced, in one run.

Instances:
- the CIFAR ResNet-20/56 from ../shared, from ``scan --fast`` (the Fisher estimate prices every probe
  that only changes values; the rest are measured; the tables are kept with ``--tables DIR``):
  ``default`` (prune at 8 ratios, weight_quant at 8/6/4/3/2 bits) and ``formats`` (prune, weight_quant
  at every bit width 2-8 in all four families, sparsity at 5 ratios and half: the large layer menus
  that mixed precision plans choose from);
- ``resnet-200x40``: a written-out bottleneck ResNet at 224 px with about 200 units (layers and
  channel groups, the residual streams coupled as in a real one), 40 options each; and the same
  with the default 8 pruning ratios per group (40 weight formats per layer);
- ``decoder-32``: a written-out 32-layer Llama-style decoder: a head group and an MLP-width group per
  layer and the group-wise weight format of every projection (see ``_instances.py``).

Per instance and formulation it prints the MILP's size (binary and continuous variables, nonzeros)
and the wall time per budget (median of ``--repeat``):
- ``now``: what ``solve`` does (dominated options left out, tensor trains for terms over three or more
  blocks, only the budgeted metrics priced);
- ``dense``: every option, every coupled term as z over the product of its options (the formulation
  before); its size only where it would pass ``--dense-limit`` variables.

    python bench/bench_solver.py [--instances resnet20,resnet56,resnet-200x40,decoder-32]
        [--menus default,formats] [--budgets size=0.156,size=0.1,macs=0.5] [--repeat 1] [--tables DIR]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ROOT, cifar_resnets, cifar_splits, cifar_test_dir  # noqa: E402

BITS = range(2, 9)
MENUS = {
    "default": {"prune": [{"ratio": r} for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)],
                "weight_quant": [{"bits": b} for b in (8, 6, 4, 3, 2)]},
    "formats": {"prune": [{"ratio": r} for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)],
                "weight_quant": [{"bits": b, **f} for b in BITS
                                 for f in ({}, {"zero_point": True}, {"group": 64},
                                           {"group": 64, "zero_point": True})],
                "sparsity": [{"ratio": r} for r in (0.5, 0.7, 0.8, 0.9, 0.95)],
                "half": [{"dtype": "float16"}, {"dtype": "bfloat16"}]},
}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--instances", default="resnet20,resnet56,resnet-200x40,decoder-32")
    ap.add_argument("--menus", default="default,formats", help="the scan menus of the CIFAR ResNets")
    ap.add_argument("--budgets", default="size=0.156,size=0.1,macs=0.5")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--dense-limit", type=int, default=400_000,
                    help="solve the dense formulation only below this many variables")
    ap.add_argument("--tables", default="", help="a folder to keep the fast scans' tables in and reuse them "
                    "from (the solver's inputs; the scan is not what this bench times)")
    args = ap.parse_args()
    from _instances import decoder_lm, residual_cnn

    from sensplan.planner import Costs

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    names = args.instances.split(",")
    for label, table in _cifar_tables(args, [n for n in names if n.startswith("resnet") and "x" not in n]):
        _bench(label, Costs(table), args)
    if "resnet-200x40" in names:
        _bench("resnet-200x40 (written out)", Costs(residual_cnn(stages=(3, 8, 23, 3), options=40)), args)
        _bench("resnet-200x40, 8 pruning ratios per group (written out)",
               Costs(residual_cnn(stages=(3, 8, 23, 3), options=40, group_options=9)), args)
    if "decoder-32" in names:
        _bench("decoder-32 (written out)", Costs(decoder_lm()), args)
    return 0


def _cifar_tables(args: Any, models: list[str]) -> Iterator[tuple[str, Any]]:
    if not models:
        return
    test_dir = cifar_test_dir(args.shared)
    if test_dir is None:
        return
    from sensplan._tables import Scan
    from sensplan.sensitivity import ScanConfig, scan

    sample, calib, _, _ = cifar_splits(test_dir, 500, 256)
    for name, _, _, model in cifar_resnets(args.shared, ",".join(models)):
        for menu in args.menus.split(","):
            kept = Path(args.tables) / f"{name}-{menu}.scan.json" if args.tables else None
            if kept is not None and kept.exists():
                yield f"{name} {menu}", Scan.load(kept)
                continue
            t = time.perf_counter()
            table = scan(model, sample, ScanConfig(MENUS[menu], fast=True, fast_samples=256), calib=calib,
                         progress=False)
            print(f"({name} {menu}: fast scan {time.perf_counter() - t:.0f} s)")
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                table.save(kept)
            yield f"{name} {menu}", table


def _bench(label: str, cm: Any, args: Any) -> None:
    from sensplan.planner import Budget
    from sensplan.planner import _solver as S

    options = [len(b.options) for b in cm.blocks]
    print(f"\n{label}: {len(cm.blocks)} blocks over {len({b.unit for b in cm.blocks})} units, options per "
          f"block median {statistics.median(options):.0f} (max {max(options)})")
    dense_vars = sum(len(b.options) for b in cm.blocks) + sum(
        int(np.prod([len(cm.blocks[f].options) for f in factors]))
        for factors in {t.factors for terms in cm.terms.values() for t in terms if len(t.factors) > 1})
    for name in ("now", "dense"):
        saved = S.DENSE_MAX, S.undominated
        if name == "dense":
            if dense_vars > args.dense_limit:
                print(f"  {name:<6} {dense_vars:,} variables: not solved (over --dense-limit)")
                continue
            S.DENSE_MAX = 10**12
            S.undominated = lambda cm, *a, **k: [np.arange(len(b.options)) for b in cm.blocks]
        try:
            for text in args.budgets.split(","):
                budget = Budget.parse(text)
                p = S._Problem(cm, [budget.metric], keep=S.undominated(cm, [budget.metric], S.objective_table(cm)))
                a, _, _ = p.structure()
                times, status, drop = [], "", float("nan")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    try:
                        sol = S.solve(cm, [budget], time_limit=args.time_limit)
                        status = "optimal" if sol.optimal else f"NOT optimal, gap {sol.gap:.2g}"
                        drop = sol.predicted_drop
                    except Exception as e:  # noqa: BLE001 - an infeasible budget is a result too
                        status = f"{type(e).__name__}"
                    times.append(time.perf_counter() - t)
                print(f"  {name:<6} {text:<11} {statistics.median(times):7.2f} s  predicted drop {drop:.6g}  "
                      f"({p.n_x:,} binary, "
                      f"{p.n - p.n_x:,} continuous, {a.nnz:,} nonzeros; {status})", flush=True)
        finally:
            S.DENSE_MAX, S.undominated = saved


if __name__ == "__main__":
    sys.exit(main())
