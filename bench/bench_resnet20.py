"""Benchmark on the real ResNet-20 (../shared): scan wall time, and planned vs uniform top-1 without
fine-tuning at macs=0.5 and size=0.25. Every number is measured in this run.

    python bench/bench_resnet20.py [--samples 2000] [--shared ../shared]

The scan's wall time is compared with a baseline measured in the same run: the same probes, each
evaluated through a DataLoader that decodes the JPEGs again (what a scan without the in-memory
sample would cost). Planned and uniform models are measured on the scan's evaluation sample and on
held-out test images that neither the scan nor the BatchNorm calibration saw.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=500)
    args = ap.parse_args()

    shared = Path(args.shared)
    weights = shared / "models" / "cifar10" / "resnet20_jpeg.pt"
    test_dir = shared / "data" / "cifar10-jpg" / "test"
    if not weights.is_file() or not test_dir.is_dir():
        print(f"skipped: {shared} has no ResNet-20 weights or CIFAR-10 JPEG test set")
        return 0

    from sensplan.planner import Budget, apply_plan, load_compressed, make_plan, measure_original
    from sensplan.sensitivity import (
        DataSpec,
        ModelSpec,
        ScanConfig,
        evaluate,
        load_eval_set,
        load_model,
        scan,
    )
    from sensplan.sensitivity._data import _collate, load_calibration_set, open_dataset

    torch.manual_seed(0)
    spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet20")
    model = load_model(spec, weights)
    data_spec = DataSpec.parse(str(test_dir))
    t = time.perf_counter()
    data = load_eval_set(data_spec, args.samples, seed=0)
    calib = load_calibration_set(data, args.calib_samples, seed=0)
    load_s = time.perf_counter() - t
    held = load_eval_set(data_spec, None, seed=0, exclude=np.concatenate([data.indices, calib.indices]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; eval sample {len(data)}, calibration "
          f"{len(calib)}, held-out {len(held)} images (decoded in {load_s:.1f} s)")

    # -- scan wall time vs. re-decoding the data for every probe ---------------------------------------
    t = time.perf_counter()
    table = scan(model, data, ScanConfig(), calib=calib, model_spec=spec, weights=str(weights), progress=False)
    scan_s = time.perf_counter() - t
    probes = len(table.results)
    ds, _, _ = open_dataset(data_spec)
    loader = DataLoader(Subset(ds, data.indices.tolist()), batch_size=500, num_workers=2, collate_fn=_collate)
    decode_times, cached_times = [], []
    for _ in range(3):
        t = time.perf_counter()
        with torch.inference_mode():
            for x, _y in loader:
                model(x)
        decode_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        evaluate(model, data)
        cached_times.append(time.perf_counter() - t)
    decode_eval, cached_eval = statistics.median(decode_times), statistics.median(cached_times)
    naive_s = probes * decode_eval
    print(f"\nscan: {probes} probes in {scan_s:.1f} s ({scan_s / probes:.2f} s/probe incl. BN recalibration); "
          f"baseline (decode JPEGs per probe, no recalibration): {naive_s:.1f} s estimated from a median "
          f"{decode_eval:.2f} s/eval -> {naive_s / scan_s:.2f}x; in-memory eval {cached_eval:.2f} s "
          f"({decode_eval / cached_eval:.1f}x faster than decoding)")
    skipped = [f"{g} ({len(table.groups[g]['members'])} members)" for g in table.skipped_groups()]
    print(f"skipped groups: {', '.join(skipped)}")

    # -- planned vs uniform, no fine-tuning --------------------------------------------------------------
    before = measure_original(model, data, spec, timing=True)
    base_held = evaluate(model, held).top1
    print(f"\noriginal: top-1 {before['top1']:.4f} (sample) / {base_held:.4f} (held-out), "
          f"{before['macs'] / 1e6:.2f} M MACs, {before['payload_bytes'] / 1e6:.3f} MB, "
          f"p50 {before['latency']['p50_ms']:.2f} ms")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in ("macs=0.5", "size=0.25"):
            plan = make_plan(table, [Budget.parse(budget)])
            for variant in ("planned", "uniform"):
                alloc = plan.data["plans"][variant]
                if alloc is None:
                    rows.append((budget, variant, None))
                    continue
                out = Path(tmp) / budget / variant
                m = apply_plan(model, plan, data, out, variant=variant, calib=calib, model_spec=spec,
                               timing=True, before=before)
                compressed = load_compressed(out / "model.sensplan", load_model(spec))
                m["held_top1"] = evaluate(compressed, held).top1
                m["_alloc"] = alloc
                rows.append((budget, variant, m))
    print(f"\n{'budget':<10} {'plan':<8} {'pred top1':>9} {'top1':>7} {'held top1':>9} {'MACs':>7} {'size':>7} "
          f"{'p50 ms':>7}  allocation")
    for budget, variant, m in rows:
        if m is None:
            print(f"{budget:<10} {variant:<8} no uniform plan meets the budget")
            continue
        pred = m["predicted"]
        print(f"{budget:<10} {variant:<8} {pred['top1']:>9.4f} {m['after']['top1']:>7.4f} {m['held_top1']:>9.4f} "
              f"{m['after']['macs'] / before['macs']:>7.3f} {m['after']['payload_bytes'] / before['payload_bytes']:>7.3f} "
              f"{m['after']['latency']['p50_ms']:>7.2f}  {_summary(m)}")

    # -- every uniform candidate (one per bit width), measured: the best uniform plan in hindsight --------
    from sensplan.planner import CostModel, Plan, compress, uniform_candidates
    from sensplan.planner._plan import _allocation

    cm = CostModel(table)
    print("\nevery uniform candidate, measured on the held-out images (no fine-tuning):")
    best_uniform = {}
    for budget in ("macs=0.5", "size=0.25"):
        for cand in uniform_candidates(cm, [Budget.parse(budget)]):
            plan = make_plan(table, [Budget.parse(budget)])
            data_ = dict(plan.data)
            data_["plans"] = {"planned": _allocation(cm, table, cand.removed, cand.layer_bits,
                                                     {g: cand.ratio for g in cand.removed}, cand.predicted_drop,
                                                     cand.costs), "uniform": None}
            cmod, _ = compress(model, Plan(data_), "planned", data.example_input, calib=calib)
            held_top1 = evaluate(cmod.module, held).top1
            best_uniform[budget] = max(best_uniform.get(budget, 0.0), held_top1)
            print(f"  {budget:<10} {cand.bits:>2} bits, ratio {cand.ratio:.2f}: predicted top-1 "
                  f"{table.baseline['top1'] - cand.predicted_drop:.4f}, held-out {held_top1:.4f}")

    print("\nplanned minus uniform (held-out top-1, points):")
    for budget in ("macs=0.5", "size=0.25"):
        got = {v: m for b, v, m in rows if b == budget and m is not None}
        if "planned" in got and "uniform" in got:
            print(f"  {budget}: {100 * (got['planned']['held_top1'] - got['uniform']['held_top1']):+.2f} vs the "
                  f"uniform plan chosen by prediction; {100 * (got['planned']['held_top1'] - best_uniform[budget]):+.2f} "
                  f"vs the best uniform plan in hindsight")
    return 0


def _summary(m: dict) -> str:
    """Removed channels per group and the bit widths used, in one line."""
    from collections import Counter

    alloc = m["_alloc"]
    pruned = [f"{e['n_remove']}/{e['channels']}" for e in alloc["prune"].values() if e["n_remove"]]
    bits = Counter(e["bits"] for e in alloc["quantize"].values())
    return f"pruned {' '.join(pruned) or 'none'}; bits " + ", ".join(f"{b}x{n}" for b, n in sorted(bits.items()))


if __name__ == "__main__":
    sys.exit(main())
