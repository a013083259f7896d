"""Benchmark of the finer weight formats (every width from 2 to 8 bits, zero points, group-wise
scales) for mixed precision on the real CIFAR ResNet-20 (../shared), no fine-tuning.

The CIFAR-10 JPEG test set is split, stratified and seeded, as in bench_signals.py: the scan's
sample (2,000), BatchNorm calibration (500), an unused held-out split (2,500) and a test split
(5,000) that no choice saw. One scan of ``weight_quant`` measures every setting below on every layer;
two format families are planned from it at each size budget (without verification, on the default
signal):

- **default**: 8, 6, 4, 3, 2 bits, one symmetric scale per output channel (what sensplan scanned
  before);
- **finer**: those plus 5 bits, zero points (4a, 3a, 2a) and group-wise scales of 64 values (4g64,
  3g64, 2ag64).

For each family and budget it prints the test top-1 of the plan and of the best uniform plan of the
same family in hindsight (every uniform candidate measured on the test split), with the priced size.

    python bench/bench_formats.py [--budgets size=0.125,...] [--cache DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import DEFAULT_FORMATS as DEFAULT  # noqa: E402
from _shared import FINER_FORMATS as FINER  # noqa: E402
from _shared import best_uniform, resnet20_bench  # noqa: E402

BUDGETS = "size=0.156,size=0.125,size=0.1,size=0.078"


def main() -> int:
    setup = resnet20_bench(__doc__, BUDGETS)
    if setup is None:
        return 0
    args, weights, spec, model, (sample, calib, held, test) = setup

    from sensplan._tables import Scan
    from sensplan.planner import Budget, Verifier, make_plan
    from sensplan.sensitivity import ScanConfig, get_method, scan

    wq = get_method("weight_quant")
    finer = wq.parse_settings(",".join(FINER))
    journal = None
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        journal = Path(args.cache) / "formats.journal"
    t = time.perf_counter()
    table = scan(model, sample, ScanConfig({"weight_quant": finer}), calib=calib, model_spec=spec,
                 weights=str(weights), progress=False, journal=journal)
    print(f"scan: {len(table.results)} probes in {time.perf_counter() - t:.0f} s "
          f"({table.data['provenance'].get('probes_from_journal', 0)} from the journal)")
    default_labels = {wq.label(s) for s in wq.parse_settings(",".join(DEFAULT))}
    families = {"default": Scan({**table.data, "results": [r for r in table.results if r["label"] in default_labels]}),
                "finer": table}

    judge = Verifier(model, sample, calib, test, model_spec=spec)
    base = judge.baseline("classification")
    print(f"original top-1: test {base['held']:.4f}")
    rows = []
    for text in args.budgets.split(","):
        budget = [Budget.parse(text)]
        for family, source in families.items():
            plan = make_plan(source, budget)
            planned = plan.variant("planned")
            _, m = judge.measure(plan.data, planned, held=True, sample=False)
            best, best_label = best_uniform(judge, source, budget, plan.data)
            labels = sorted({c["label"] for c in planned["choices"].values() if c.get("method")})
            rows.append((text, family, m.score, best, best_label, planned["predicted"]["size_fraction"]))
            print(f"{text} {family:<8} plan {m.score:.4f} (size {planned['predicted']['size_fraction']:.4f}; "
                  f"{', '.join(labels)}) | best uniform {best:.4f} ({best_label}) | plan - uniform "
                  f"{100 * (m.score - best):+.2f} pt")
    print("\n== summary (test split, top-1, no fine-tuning, signal: default) ==")
    print(f"{'budget':<11} {'default plan':>12} {'uniform':>8} {'finer plan':>11} {'uniform':>8} "
          f"{'finer - default plan':>21} {'finer plan - best uniform (any)':>32}")
    by = {(r[0], r[1]): r for r in rows}
    for text in args.budgets.split(","):
        d, f = by[(text, "default")], by[(text, "finer")]
        print(f"{text:<11} {d[2]:>12.4f} {d[3]:>8.4f} {f[2]:>11.4f} {f[3]:>8.4f} {100 * (f[2] - d[2]):>+21.2f} "
              f"{100 * (f[2] - max(d[3], f[3])):>+32.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
