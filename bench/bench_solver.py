"""Benchmark of the exact allocation (the MILP) on the CIFAR ResNets' real coupled costs.

The instances come from ``scan --fast`` (the Fisher estimate prices every probe that only changes
values; the rest are measured), so they are built in minutes; the solver sees only the table. Per
model it prints the instance's size (units, options per unit, the MILP's binary and continuous
variables, nonzeros) and the solver's wall time per budget, median of ``--repeat`` solves:

- ``default``: prune (8 ratios) and weight_quant (8/6/4/3/2 bits), the default scan;
- ``formats``: prune, and weight_quant at every bit width 2–8 in all four families (plain,
  asymmetric, group-wise 64, both), sparsity (5 ratios) and half: the large layer menus that
  mixed precision plans choose from.

    python bench/bench_solver.py [--models resnet20,resnet56] [--budgets size=0.1,macs=0.5] [--repeat 1]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

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
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--menus", default="default,formats")
    ap.add_argument("--budgets", default="size=0.156,size=0.1,macs=0.5")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tables", default="", help="a folder to keep the fast scans' tables in and reuse them "
                    "from (the solver's inputs; the scan is not what this bench times)")
    args = ap.parse_args()
    test_dir = cifar_test_dir(args.shared)
    if test_dir is None:
        return 0
    from sensplan._tables import Scan
    from sensplan.planner import Budget, Costs
    from sensplan.planner._solver import _Problem, solve
    from sensplan.sensitivity import ScanConfig, scan

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sample, calib, _, _ = cifar_splits(test_dir, 500, 256)
    for name, _, _, model in cifar_resnets(args.shared, args.models):
        for menu in args.menus.split(","):
            t = time.perf_counter()
            kept = Path(args.tables) / f"{name}-{menu}.scan.json" if args.tables else None
            if kept is not None and kept.exists():
                table = Scan.load(kept)
            else:
                table = scan(model, sample, ScanConfig(MENUS[menu], fast=True, fast_samples=256), calib=calib,
                             progress=False)
                if kept is not None:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    table.save(kept)
            scan_s = time.perf_counter() - t
            cm = Costs(table)
            p = _Problem(cm)
            a, _, _ = p.structure()
            options = [len(b.options) for b in cm.blocks]
            print(f"\n{name} {menu}: {len(cm.blocks)} blocks, options per block median "
                  f"{statistics.median(options):.0f} (max {max(options)}), {p.n_x} binary and "
                  f"{p.n - p.n_x} continuous variables, {a.nnz} nonzeros in the structure rows "
                  f"(fast scan {scan_s:.0f} s)")
            for text in args.budgets.split(","):
                times, status = [], ""
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    try:
                        sol = solve(cm, [Budget.parse(text)])
                        status = sol.status
                    except Exception as e:  # noqa: BLE001 - an infeasible budget is a result too
                        status = f"{type(e).__name__}"
                    times.append(time.perf_counter() - t)
                print(f"  {text:<11} {statistics.median(times):7.2f} s (median of {args.repeat}; {status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
