"""Benchmark: the applied plan on ONNX Runtime and on torch, measured against baselines in the same
run, on the real CIFAR ResNet-20 and ResNet-56 (../shared, CIFAR-10 JPEG). Every step is the CLI a
user runs (scan, profile, plan, apply, frontier), in this process.

    python bench/bench_runtime.py [--models resnet20,resnet56] [--threads 1] [--batch 64] [--out DIR]

Per model:
1. scan (prune --round-to 8, int8 weights, int8 activations) on 1,000 test images;
2. the macs=0.5 plan for --runtime onnxruntime, applied: latency against the original on ORT at
   batch B and on torch at batch 1 (timed interleaved with the original, in one process);
3. a mixed int8 plan (int8 where it costs least, at a latency budget of 0.6 of the original's ORT
   latency, from `sensplan profile`'s table), against ORT's own `quantize_static` of the whole
   model (QDQ, per-channel int8 weights, MinMax) on the same 500 calibration images: top-1 on the
   same measurement images, latency interleaved at batch B;
4. the tightest latency budget the table says int8 and pruning together reach (+0.05), and a
   latency=0.6 plan: predicted against measured latency; the latter's top-1 against the macs plan
   of the nearest predicted latency (applied the same way);
5. on ResNet-20 only, a frontier of 8 macs budgets with 3 measured.

The thread count and the load average are printed; timings are medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _shared import ROOT  # bench/ is on sys.path when run as a script


def cli(*argv: str) -> int:
    from sensplan.cli import main

    t = time.perf_counter()
    code = main([str(a) for a in argv])
    print(f"    [{argv[0]} exit {code}, {time.perf_counter() - t:.0f} s]", flush=True)
    return code


def metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


def speeds(timing: dict[str, Any], batch: int) -> str:
    """p50 original -> compressed, and the speed-up, at batch 1 and ``batch`` (a ``timing`` record)."""
    parts = []
    for b, digits in (("1", 3), (str(batch), 2)):
        o, c = timing["batches"][b]["original"]["p50_ms"], timing["batches"][b]["compressed"]["p50_ms"]
        parts.append(f"batch {b} {o:.{digits}f} -> {c:.{digits}f} ms ({o / c:.2f}x)")
    return "p50 " + ", ".join(parts) + (f"; WARNING {timing['warning']}" if timing.get("warning") else "")


def ort_line(m: dict[str, Any], batch: int) -> str:
    rt = m["runtime"]
    return (f"top-1 ORT {rt['original']['score']:.4f} -> {rt['compressed']['score']:.4f}; ORT "
            f"{speeds(rt['latency'], batch)}; model.onnx {rt['original']['file_bytes'] / 1e6:.3f} -> "
            f"{rt['compressed']['file_bytes'] / 1e6:.3f} MB; {rt['quantized']['int8_nodes']} int8 layers")


def torch_line(m: dict[str, Any], batch: int) -> str:
    return f"torch {speeds(m['timing'], batch)}"


def ort_quantize_static_baseline(model: Any, calib_x: Any, data: Any, ours: Path, threads: int, batch: int
                                 ) -> None:
    """ORT's own static int8 of the whole model (same calibration images) against our model.onnx."""
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from sensplan.planner import OrtModel, compare_latency, export_onnx

    with tempfile.TemporaryDirectory() as d:
        fp32, q = Path(d) / "fp32.onnx", Path(d) / "ort_int8.onnx"
        export_onnx(model, data.x[:1], fp32)
        x = calib_x.numpy()

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.it = iter([{"input": x[i:i + 32]} for i in range(0, len(x), 32)])

            def get_next(self) -> Any:
                return next(self.it, None)

        quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        theirs, mine = OrtModel(q, threads), OrtModel(ours, threads)
        y = data.y.numpy()

        def correct(m: Any) -> Any:
            out = np.concatenate([m.run_numpy(data.x[i:i + 250].numpy()) for i in range(0, len(data), 250)])
            return (out.argmax(1) == y).astype(float)

        c1, c2 = correct(theirs), correct(mine)
        t1, t2 = float(c1.mean()), float(c2.mean())
        se = float(np.std(c2 - c1, ddof=1) / np.sqrt(len(y)))
        lat = compare_latency({"ort_quantize_static": theirs.run_numpy, "plan": mine.run_numpy},
                              data.x[:1].numpy(), [1, batch], threads=threads)
        for b, ts in lat["batches"].items():
            a, p = ts["ort_quantize_static"]["p50_ms"], ts["plan"]["p50_ms"]
            print(f"    batch {b}: ORT quantize_static {a:.3f} ms, plan {p:.3f} ms: plan at {a / p:.2f}x ORT's speed")
        print(f"    top-1 on the same {len(data)} images: ORT quantize_static {t1:.4f}, plan {t2:.4f} "
              f"({100 * (t2 - t1):+.2f} pt ± {100 * se:.2f} paired SE); load {lat['load_before']['loadavg_1m']} -> "
              f"{lat['load_after']['loadavg_1m']}" + (f"; WARNING {lat['warning']}" if lat["warning"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    test_dir = Path(args.shared) / "data" / "cifar10-jpg" / "test"
    if not test_dir.is_dir():
        print(f"skipped: {args.shared} has no CIFAR-10 JPEG test set")
        return 0
    import onnxruntime
    import torch

    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{args.threads} thread(s) for timing, batch {args.batch}; load average {os.getloadavg()[0]:.2f} on "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sensplan-bench-runtime-"))
    for name in args.models.split(","):
        weights = Path(args.shared) / "models" / "cifar10" / f"{name}_jpeg.pt"
        if not weights.is_file():
            print(f"\n{name}: skipped, no {weights}")
            continue
        run_model(name, weights, test_dir, root / name, args)
    print(f"\nruns kept in {root}; load average at the end {os.getloadavg()[0]:.2f}")
    return 0


def run_model(name: str, weights: Path, test_dir: Path, out: Path, args: argparse.Namespace) -> None:
    from sensplan.planner import Plan
    from sensplan.sensitivity import ModelSpec, load_model

    print(f"\n== {name} ==", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model_flags = ["--model", f"{ROOT / 'examples' / 'cifar_resnet.py'}:{name}", "--weights", str(weights)]
    data_flags = ["--data", str(test_dir), "--samples", str(args.samples)]
    timing = ["--threads", str(args.threads)]
    scan = out / "scan.json"
    if not scan.exists():
        cli("scan", *model_flags, *data_flags, "--methods", "prune,weight_quant,act_quant",
            "--setting", "weight_quant=8", "--setting", "act_quant=minmax,percentile", "--round-to", "8",
            "--out", scan)
    table = out / "latency.json"
    if not table.exists():
        cli("profile", "--scan", scan, "--runtime", "onnxruntime", "--batch", args.batch, *timing, "--out", table)
    prof = json.loads(table.read_text())["profile"]
    print(f"  profile: ORT at batch {args.batch}: whole model {prof['model_ms']:.2f} ms, layers "
          f"{prof['layers_ms']:.2f} ms, {prof['operators_timed']} operator shapes in {prof['seconds']:.0f} s")
    apply_flags = [*model_flags, *data_flags, "--runtime", "onnxruntime", "--latency-batch", str(args.batch),
                   *timing]

    # 1. macs=0.5 on ORT and torch
    print("\n  macs=0.5 (prune only, widths multiples of 8):", flush=True)
    cli("plan", "--scan", scan, "--budget", "macs=0.5", "--runtime", "onnxruntime", "--cost-table", table,
        "--out", out / "macs.json")
    cli("apply", *apply_flags, "--plan", out / "macs.json", "--out", out / "macs")
    for variant, d in (("planned", out / "macs"), ("uniform", out / "macs" / "uniform")):
        if (d / "metrics.json").exists():
            m = metrics(d)
            print(f"    {variant}: top-1 {m['before']['score']:.4f} -> {m['after']['score']:.4f}, MACs "
                  f"{m['after']['macs'] / m['before']['macs']:.3f}; {ort_line(m, args.batch)}")
            print(f"      {torch_line(m, args.batch)}")

    # 2. mixed int8 against ORT's quantize_static
    print("\n  mixed int8 (int8 weights + activations only, latency=0.6 of the ORT original):", flush=True)
    int8_scan = out / "scan_int8.json"
    data = json.loads(scan.read_text())
    data["results"] = [r for r in data["results"] if r["method"] != "prune"]
    int8_scan.write_text(json.dumps(data))
    cli("plan", "--scan", int8_scan, "--budget", "latency=0.6", "--cost-table", table, "--runtime", "onnxruntime",
        "--out", out / "int8.json")
    cli("apply", *apply_flags, "--plan", out / "int8.json", "--variants", "planned", "--out", out / "int8")
    if (out / "int8" / "metrics.json").exists():
        m = metrics(out / "int8")
        print(f"    planned: top-1 {m['before']['score']:.4f} -> {m['after']['score']:.4f}; {ort_line(m, args.batch)}")
        spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:{name}")
        model = load_model(spec, weights)
        plan = Plan.load(out / "int8.json")
        calib_rec = plan.data["scan"].get("calibration") or {}
        from sensplan.planner import scan_sample

        _, calib, _, _ = scan_sample(plan.data["scan"]["sample"], calib_rec, "")
        measured = _measurement_data(out / "int8", test_dir)
        import torch

        torch.set_num_threads(args.threads)
        ort_quantize_static_baseline(model, calib.x[:500], measured, out / "int8" / "model.onnx", args.threads,
                                     args.batch)

    # 3. latency budgets from the table: predicted against measured; against the macs plan of equal latency
    tight = tightest_latency(scan, table)
    print(f"\n  latency={tight} (int8 and pruning together; the table's cheapest reachable latency + 0.05):",
          flush=True)
    cli("plan", "--scan", scan, "--budget", f"latency={tight}", "--cost-table", table, "--runtime", "onnxruntime",
        "--out", out / "latency_tight.plan.json")
    cli("apply", *apply_flags, "--plan", out / "latency_tight.plan.json", "--out", out / "lat_tight")
    for variant, d in (("planned", out / "lat_tight"), ("uniform", out / "lat_tight" / "uniform")):
        if (d / "metrics.json").exists():
            m = metrics(d)
            c = m["comparison"].get("latency") or {}
            print(f"    {variant}: top-1 {m['before']['score']:.4f} -> {m['after']['score']:.4f}, MACs "
                  f"{m['after']['macs'] / m['before']['macs']:.3f}; latency predicted {c.get('predicted', 0):.2f} ms, "
                  f"measured {c.get('measured', 0):.2f} ms ({c.get('error') or 0:+.1%})")
            print(f"      {ort_line(m, args.batch)}")
    print("\n  latency=0.6 (from sensplan profile's table):", flush=True)
    cli("plan", "--scan", scan, "--budget", "latency=0.6", "--cost-table", table, "--runtime", "onnxruntime",
        "--out", out / "latency.json.plan")
    cli("apply", *apply_flags, "--plan", out / "latency.json.plan", "--variants", "planned", "--out", out / "lat")
    if (out / "lat" / "metrics.json").exists():
        m = metrics(out / "lat")
        c = m["comparison"]["latency"]
        print(f"    planned: top-1 {m['before']['score']:.4f} -> {m['after']['score']:.4f}; latency predicted "
              f"{c['predicted']:.2f} ms, measured {c['measured']:.2f} ms ({c['error']:+.1%}); fraction of the "
              f"original predicted {c['fraction_predicted']:.3f}, measured {c['fraction_measured']:.3f}")
        print(f"      {ort_line(m, args.batch)}")
        # the macs plan whose predicted latency is nearest the latency plan's measured one
        target = c["fraction_measured"]
        best = None
        for frac in (0.35, 0.4, 0.5, 0.6, 0.7, 0.8):
            p = out / f"macs{frac}.json"
            if cli("plan", "--scan", scan, "--budget", f"macs={frac}", "--cost-table", table, "--runtime",
                   "onnxruntime", "--no-verify", "--out", p) != 0:
                continue
            got = Plan.load(p).variant("planned")["predicted"]["latency_fraction"]
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (frac, got, p)
        if best is not None:
            frac, got, p = best
            cli("apply", *apply_flags, "--plan", p, "--variants", "planned", "--out", out / "macs_eq")
            me = metrics(out / "macs_eq")
            rt = me["runtime"]["latency"]["batches"][str(args.batch)]
            print(f"    macs={frac} (predicted latency fraction {got:.3f}): top-1 {me['after']['score']:.4f}, measured "
                  f"latency fraction {rt['compressed']['p50_ms'] / rt['original']['p50_ms']:.3f} vs the latency plan's "
                  f"top-1 {m['after']['score']:.4f} at {target:.3f}")

    # 4. frontier (ResNet-20 only)
    if name == "resnet20":
        print("\n  frontier: 8 macs budgets, 3 measured:", flush=True)
        cli("frontier", "--scan", scan, "--metric", "macs", "--points", "8", "--measure", "3", "--out",
            out / "frontier")
        f = json.loads((out / "frontier" / "frontier.json").read_text())
        for pt in f.get("points", []):
            pl, un = pt.get("planned") or {}, pt.get("uniform") or {}
            meas = pl.get("measured") or {}
            umeas = un.get("measured") or {}
            print(f"    budget {pt['budget']['fraction']:.3f}: planned predicted {pl.get('predicted', {}).get('drop')}"
                  f", measured {meas.get('drop')}; uniform predicted {un.get('predicted', {}).get('drop')}, "
                  f"measured {umeas.get('drop')}")


def tightest_latency(scan: Path, table: Path) -> float:
    """The cheapest latency fraction the table says the scan's ORT options reach, plus 0.05."""
    from sensplan._tables import Scan
    from sensplan.planner import Costs, TableCosts, min_cost, runtime_options

    s, _ = runtime_options(Scan.load(scan), "onnxruntime")
    cm = Costs(s, [TableCosts.load(table)])
    cheapest = cm.evaluate(min_cost(cm, "latency").choice)["latency"] / cm.original["latency"]
    return round(min(0.95, cheapest + 0.05), 2)


def _measurement_data(result: Path, test_dir: Path) -> Any:
    """The images apply measured ``result`` on (the report half of the held-out split), drawn again."""
    from sensplan.planner import Plan, scan_sample, split_held
    from sensplan.sensitivity import DataSpec, load_eval_set

    plan = Plan.load(result / "plan.json")
    rec = plan.data["scan"]["sample"]
    _, _, exclude, _ = scan_sample(rec, plan.data["scan"].get("calibration"), "")
    draw = plan.data["verification"]["held_out_draw"]
    held = load_eval_set(DataSpec.from_record(dict(rec)), draw["n"], int(draw["seed"]), exclude=exclude)
    _, report = split_held(held, int(draw["split_seed"]), [])
    return report


if __name__ == "__main__":
    sys.exit(main())
