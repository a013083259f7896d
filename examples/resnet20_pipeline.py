"""The whole pipeline on the real ResNet-20 from ../shared: scan, plan at macs=0.5, apply, report.

    python examples/resnet20_pipeline.py [--out runs/resnet20] [--budget macs=0.5] [--samples 2000]

Exits 0 with a message when ../shared (weights and the CIFAR-10 JPEG test set) is absent.
Add ``--train-data ../shared/data/cifar10-jpg/train --epochs 1`` to fine-tune with distillation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/resnet20")
    ap.add_argument("--budget", default="macs=0.5")
    ap.add_argument("--samples", default="2000")
    ap.add_argument("--shared", default=str(SHARED))
    args, extra = ap.parse_known_args()
    shared = Path(args.shared)
    weights = shared / "models" / "cifar10" / "resnet20_jpeg.pt"
    test = shared / "data" / "cifar10-jpg" / "test"
    if not (weights.is_file() and test.is_dir()):
        print(f"skipped: {shared} does not hold resnet20_jpeg.pt and cifar10-jpg/test")
        return 0

    from sensplan.cli import main as sensplan

    code = sensplan(["run", "--model", f"{HERE / 'cifar_resnet.py'}:resnet20", "--weights", str(weights),
                     "--data", str(test), "--samples", args.samples, "--budget", args.budget,
                     "--out", args.out, *extra])
    if code != 0:
        return code
    out = Path(args.out)
    scan = json.loads((out / "scan.json").read_text())
    for gid, g in scan["groups"].items():
        if g["status"] == "skipped":
            print(f"skipped group {gid} ({len(g['members'])} members): {g['reason']}")
    for sub in ("", "uniform"):
        m = json.loads((out / "result" / sub / "metrics.json").read_text())
        print(f"{m['variant']:>8}: top-1 {m['before']['score']:.4f} -> {m['after']['score']:.4f}; MACs "
              f"{m['after']['macs'] / m['before']['macs']:.3f} of the original; budget met: "
              f"{all(b['met'] for b in m['budgets'])}")
    print(f"report: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
