"""Benchmark on the real ResNet-20 (../shared): scan wall time, planned vs uniform top-1 without
fine-tuning at macs=0.5 and size=0.25 (prune + int weight bits), and at size=0.125 the weight-bits-only
plan next to plans that mix bits with unstructured and 2:4 sparsity, fp16 and int8 activations.
Every number is measured in this run.

    python bench/bench_resnet20.py [--samples 2000] [--shared ../shared]

The scan's wall time is compared with a baseline measured in the same run: the same probes, each
evaluated through a DataLoader that decodes the JPEGs again (what a scan without the in-memory
sample would cost). Planned and uniform models are measured on the scan's evaluation sample and on
held-out test images that neither the scan nor the BatchNorm calibration saw.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _shared import ROOT, parser, resnet20_files  # bench/ is on sys.path when run as a script
from torch.utils.data import DataLoader, Subset


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
        all_methods,
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
    tmpdir = tempfile.TemporaryDirectory()
    journal = Path(tmpdir.name) / "scan.json.journal"
    t = time.perf_counter()
    table = scan(model, data, ScanConfig(), calib=calib, model_spec=spec, weights=str(weights),
                 progress=False, journal=journal)
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
    print(f"\nscan (prune + weight_quant): {probes} probes in {scan_s:.1f} s ({scan_s / probes:.2f} s/probe "
          f"incl. BN recalibration); baseline (decode JPEGs per probe, no recalibration): {naive_s:.1f} s "
          f"estimated from a median {decode_eval:.2f} s/eval -> {naive_s / scan_s:.2f}x; in-memory eval "
          f"{cached_eval:.2f} s ({decode_eval / cached_eval:.1f}x faster than decoding)")
    skipped = [f"{g} ({len(table.groups[g]['members'])} members)" for g in table.skipped_groups()]
    print(f"skipped groups: {', '.join(skipped)}")

    # -- the new methods: the same journal, so the first scan's probes are reused, not redone -------------
    all_settings = {m.name: m.default_settings for m in all_methods()}
    t = time.perf_counter()
    full = scan(model, data, ScanConfig(all_settings), calib=calib, model_spec=spec, weights=str(weights),
                progress=False, journal=journal)
    full_s = time.perf_counter() - t
    reused = full.data["provenance"]["probes_from_journal"]
    per_method = Counter(r["method"] for r in full.results)
    print(f"scan (all {len(all_settings)} methods): {len(full.results)} probes in {full_s:.1f} s, {reused} "
          f"reused from the journal; per method: " + ", ".join(f"{k} {v}" for k, v in per_method.items()))

    # -- planned vs uniform, no fine-tuning --------------------------------------------------------------
    before = measure_original(model, data, spec, timing=True)
    base_held = evaluate(model, held).top1
    print(f"\noriginal: top-1 {before['score']:.4f} (sample) / {base_held:.4f} (held-out), "
          f"{before['macs'] / 1e6:.2f} M MACs, {before['payload_bytes'] / 1e6:.3f} MB, "
          f"p50 {before['latency']['p50_ms']:.2f} ms")
    cases = [("macs=0.5", table, "prune + int bits"), ("size=0.25", table, "prune + int bits"),
             ("size=0.125", full.restricted(["weight_quant"]), "int bits only"),
             ("size=0.125", full.restricted(["weight_quant", "sparsity", "sparsity_2_4"]),
              "int bits + sparsity"),
             ("size=0.125", full, "all methods"),
             ("bops=0.03", full, "all methods")]
    rows = []
    for budget, tab, what in cases:
        plan = make_plan(tab, [Budget.parse(budget)])
        for variant in ("planned", "uniform"):
            alloc = plan.data["plans"][variant]
            if alloc is None:
                rows.append((budget, what, variant, None))
                continue
            out = Path(tmpdir.name) / budget / what.replace(" ", "_") / variant
            m = apply_plan(model, plan, data, out, variant=variant, calib=calib, model_spec=spec,
                           timing=True, before=before)
            compressed = load_compressed(out / "model.sensplan", load_model(spec))
            m["held_top1"] = evaluate(compressed, held).top1
            m["_alloc"] = alloc
            rows.append((budget, what, variant, m))
    print(f"\n{'budget':<10} {'methods':<20} {'plan':<8} {'pred':>7} {'top1':>7} {'held':>7} {'MACs':>6} "
          f"{'size':>6} {'BOPs':>6} {'p50 ms':>7}  allocation")
    for budget, what, variant, m in rows:
        if m is None:
            print(f"{budget:<10} {what:<20} {variant:<8} no uniform plan meets the budget")
            continue
        pred, a = m["predicted"], m["after"]
        print(f"{budget:<10} {what:<20} {variant:<8} {pred['score']:>7.4f} {a['score']:>7.4f} "
              f"{m['held_top1']:>7.4f} {a['macs'] / before['macs']:>6.3f} "
              f"{a['payload_bytes'] / before['payload_bytes']:>6.3f} {a['bops'] / before['bops']:>6.3f} "
              f"{a['latency']['p50_ms']:>7.2f}  {_summary(m)}")
    exact = all(abs(c["ratio"] - 1) < 1e-4 for _, _, _, m in rows if m
                for k, c in m["comparison"].items() if k in ("macs", "params", "bops"))
    size_ratios = [m["comparison"]["size"]["ratio"] for _, _, _, m in rows if m]
    print(f"measured / predicted: MACs, params, BOPs exact: {exact}; size {min(size_ratios):.5f} .. "
          f"{max(size_ratios):.5f}")

    # -- every uniform candidate, measured: the best uniform plan in hindsight ----------------------------
    from sensplan.planner import Costs, Plan, compress, uniform_candidates
    from sensplan.planner._plan import _allocation
    from sensplan.planner._solver import uniform_label

    print("\nevery uniform candidate (prune + int bits), measured on the held-out images (no fine-tuning):")
    best_uniform: dict[str, float] = {}
    cm = Costs(table)
    for budget in ("macs=0.5", "size=0.25"):
        plan = make_plan(table, [Budget.parse(budget)])
        for cand in uniform_candidates(cm, [Budget.parse(budget)]):
            data_ = dict(plan.data)
            alloc = _allocation(cm, cand.choice, cand.costs, cand.predicted_drop, table)
            data_["plans"] = {"planned": alloc, "uniform": None}
            cmod, _ = compress(model, Plan(data_), "planned", data.example_input, calib=calib)
            held_top1 = evaluate(cmod.module, held).top1
            best_uniform[budget] = max(best_uniform.get(budget, 0.0), held_top1)
            print(f"  {budget:<10} {uniform_label(cm, cand):<28}: predicted top-1 "
                  f"{table.baseline['score'] - cand.predicted_drop:.4f}, held-out {held_top1:.4f}")

    print("\nplanned minus uniform (held-out top-1, points):")
    for budget, what, _v, _m in rows[::2]:
        got = {v: m for b, w, v, m in rows if b == budget and w == what and m is not None}
        if "planned" in got and "uniform" in got:
            line = (f"  {budget} ({what}): {100 * (got['planned']['held_top1'] - got['uniform']['held_top1']):+.2f} "
                    f"vs the uniform plan chosen by prediction")
            if budget in best_uniform and what == "prune + int bits":
                gap = 100 * (got["planned"]["held_top1"] - best_uniform[budget])
                line += f"; {gap:+.2f} vs the best uniform in hindsight"
            print(line)
    tmpdir.cleanup()
    return 0


def _summary(m: dict) -> str:
    """What the allocation applies, counted per option label, in one line."""
    from collections import Counter

    labels = Counter(c["label"] for c in m["_alloc"]["choices"].values() if c["method"])
    return ", ".join(f"{k} x{n}" for k, n in sorted(labels.items(), key=lambda kv: -kv[1])) or "none"


if __name__ == "__main__":
    sys.exit(main())
