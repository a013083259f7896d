"""The ``sensplan`` command line: scan | plan | apply | report | run | demo | models.

User mistakes print one message and exit with code 2 (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sensplan._errors import SensplanError, UserInputError
from sensplan._version import __version__

EXIT_USER_ERROR = 2

_EPILOGS = {
    "scan": """example:
  sensplan scan --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt \\
      --data ../shared/data/cifar10-jpg/test --samples 2000 --out scan.json
  sensplan scan --model torchvision:resnet18 --weights my.pt --model-arg num_classes=10 \\
      --data imagefolder:val/ --resize 256 --crop 224 --out scan.json""",
    "plan": """example:
  sensplan plan --scan scan.json --budget macs=0.5 --out plan.json
  sensplan plan --scan scan.json --budget size=25% --budget macs=0.8 --out plan.json
  sensplan plan --scan scan.json --max-drop 0.01 --minimize size --out plan.json""",
    "apply": """example:
  sensplan apply --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt --plan plan.json \\
      --data ../shared/data/cifar10-jpg/test --out result/
  sensplan apply ... --train-data ../shared/data/cifar10-jpg/train --epochs 2 --out result/""",
    "report": """example:
  sensplan report --scan scan.json --plan plan.json --result result/ --out report/""",
    "run": """example:
  sensplan run --model examples/cifar_resnet.py:resnet20 \\
      --weights ../shared/models/cifar10/resnet20_jpeg.pt \\
      --data ../shared/data/cifar10-jpg/test --budget macs=0.5 --out runs/r20""",
    "demo": """example:
  sensplan demo                 # trains a small CNN on scikit-learn's digits, then scan/plan/apply/report
  sensplan demo --out /tmp/demo --budget size=0.25""",
}


# -- argument groups ----------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="SPEC",
                   help="torchvision:NAME | sensplan:NAME | path/file.py:FACTORY | package.module:FACTORY | pickle:FILE")
    g.add_argument("--weights", metavar="FILE", help="checkpoint: a state dict, {'state_dict': ...} nesting and "
                                                      "'module.' prefixes are handled (loaded with weights_only=True)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model factory, e.g. num_classes=10 (repeatable)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow --model pickle:FILE (unpickling runs code from the file: only for trusted files)")


def _data_args(p: argparse.ArgumentParser, *, calib: bool = True) -> None:
    g = p.add_argument_group("evaluation data")
    g.add_argument("--data", required=True, metavar="SPEC",
                   help="DIR or imagefolder:DIR (class subfolders) | cifar10:ROOT[:train|test] | digits[:train|test]")
    g.add_argument("--samples", type=int, default=2000, metavar="N",
                   help="size of the stratified, seeded evaluation sample (default 2000; 0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the evaluation sample (default 0)")
    g.add_argument("--resize", type=int, metavar="PX", help="resize the shorter image side to PX")
    g.add_argument("--crop", type=int, metavar="PX", help="center-crop to PX x PX")
    g.add_argument("--mean", metavar="M1,M2,M3", help="normalisation mean (default ImageNet's; digits 0.5)")
    g.add_argument("--std", metavar="S1,S2,S3", help="normalisation std (default ImageNet's; digits 0.5)")
    g.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    if calib:
        c = p.add_argument_group("BatchNorm recalibration")
        c.add_argument("--calib-data", metavar="SPEC",
                       help="data for BatchNorm recalibration (default: --train-data if given, else samples of "
                            "--data outside the evaluation sample)")
        c.add_argument("--calib-samples", type=int, default=500, metavar="N", help="default 500")
        c.add_argument("--no-bn-recalibration", action="store_true",
                       help="do not recalibrate BatchNorm statistics after pruning/quantizing")


def _scan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scan settings")
    g.add_argument("--bits", default="8,6,4,3,2", help="weight bit widths to scan (default 8,6,4,3,2)")
    g.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8",
                   help="fractions of each group's channels to remove (default 0.1,...,0.8)")
    g.add_argument("--no-prune", action="store_true", help="scan quantization only")
    g.add_argument("--no-quantize", action="store_true", help="scan pruning only")


def _plan_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("budget")
    g.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE",
                   help="size|macs|bops|params; a fraction (0.5, 50%%) of the original or an absolute value "
                        "(2MB, 20M). Repeat for several budgets.")
    g.add_argument("--max-drop", metavar="DROP",
                   help="instead: the cheapest plan whose predicted top-1 drop is at most DROP (0.01 or 1%%)")
    g.add_argument("--minimize", choices=["size", "macs", "bops", "params"],
                   help="the cost to minimise with --max-drop (default: the first budget's metric)")


def _apply_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (knowledge distillation from the original model)")
    g.add_argument("--train-data", metavar="SPEC", help="training data; fine-tuning runs only when given")
    g.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default 1)")
    g.add_argument("--train-samples", type=int, metavar="N", help="use a stratified sample of N training items")
    g.add_argument("--lr", type=float, default=0.01, help="initial learning rate, cosine decay (default 0.01)")
    g.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T (default 4)")
    g.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss (default 0.7)")
    g.add_argument("--max-steps", type=int, help="stop fine-tuning after this many optimizer steps")
    g.add_argument("--augment", action="store_true", help="random crop (1/8 padding) and horizontal flip")
    o = p.add_argument_group("execution")
    o.add_argument("--variants", default="planned,uniform",
                   help="which allocations of the plan to apply and measure (default planned,uniform)")
    o.add_argument("--no-timing", action="store_true", help="skip the latency measurement")


# -- helpers ------------------------------------------------------------------------------------
def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserInputError(f"--{what} takes comma-separated numbers such as 0.5,0.5,0.5. Got {text!r}.") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserInputError(f"--{what} takes comma-separated integers such as 8,4. Got {text!r}.") from None


def _model_spec(args: argparse.Namespace) -> Any:
    from sensplan.sensitivity import ModelSpec

    kwargs = {}
    for item in args.model_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserInputError(f"--model-arg takes KEY=VALUE, e.g. num_classes=10. Got {item!r}.")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return ModelSpec(args.model, kwargs)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from sensplan.sensitivity import load_model

    spec = _model_spec(args)
    return load_model(spec, args.weights, allow_pickle=args.allow_pickle), spec


def _preprocess(args: argparse.Namespace) -> Any:
    from sensplan.sensitivity import Preprocess

    return Preprocess(resize=args.resize, crop=args.crop, mean=_floats(args.mean, "mean"), std=_floats(args.std, "std"))


def _data_spec(text: str, args: argparse.Namespace) -> Any:
    from sensplan.sensitivity import DataSpec

    return DataSpec.parse(text, _preprocess(args))


def _eval_data(args: argparse.Namespace) -> tuple[Any, Any]:
    from sensplan.sensitivity import load_eval_set
    from sensplan.sensitivity._data import load_calibration_set

    if args.samples < 0:
        raise UserInputError(f"--samples must be >= 0 (0 = all). Got {args.samples}.")
    data = load_eval_set(_data_spec(args.data, args), args.samples or None, args.seed)
    calib = None
    if not getattr(args, "no_bn_recalibration", True):
        source = getattr(args, "calib_data", None) or getattr(args, "train_data", None)
        calib = load_calibration_set(data, args.calib_samples, args.seed,
                                     _data_spec(source, args) if source else None)
    return data, calib


def _budgets(args: argparse.Namespace) -> tuple[list[Any], float | None]:
    from sensplan.planner import Budget, parse_max_drop
    from sensplan.planner._plan import check_objective

    budgets = [Budget.parse(b) for b in args.budget]
    max_drop = parse_max_drop(args.max_drop) if args.max_drop is not None else None
    check_objective(budgets, max_drop, args.minimize)
    return budgets, max_drop


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _variants(args: argparse.Namespace) -> list[str]:
    from sensplan.planner._plan import VARIANTS

    vs = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in vs if v not in VARIANTS]
    if bad or not vs:
        raise UserInputError(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}. Got {args.variants!r}.")
    return vs


# -- verbs ----------------------------------------------------------------------------------------
def cmd_scan(args: argparse.Namespace) -> int:
    from sensplan.sensitivity import ScanConfig, scan

    cfg = ScanConfig(bits=_ints(args.bits, "bits"), ratios=_floats(args.ratios, "ratios") or (),
                     batch_size=args.batch_size)
    if args.no_prune and args.no_quantize:
        raise UserInputError("--no-prune and --no-quantize together leave nothing to scan. Drop one.")
    _check_writable(args.out)
    model, spec = _load_model(args)
    data, calib = _eval_data(args)
    table = scan(model, data, cfg, calib=calib, model_spec=spec, weights=args.weights,
                 prune=not args.no_prune, quantize=not args.no_quantize).save(args.out)
    skipped = table.skipped_groups()
    _say(f"scanned {len(table.results)} probes in {table.data['provenance']['seconds']:.1f} s; baseline top-1 "
         f"{table.baseline['top1']:.4f} on {table.baseline['n']} samples; {len(skipped)} group(s) skipped")
    for gid, why in skipped.items():
        _say(f"  skipped {gid}: {why}")
    print(args.out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sensplan.planner import make_plan
    from sensplan.sensitivity import Scan

    budgets, max_drop = _budgets(args)
    _check_writable(args.out)
    plan = make_plan(Scan.load(args.scan), budgets, max_drop=max_drop, minimize=args.minimize).save(args.out)
    _print_plan(plan)
    print(args.out)
    return 0


def _print_plan(plan: Any) -> None:
    from tabulate import tabulate

    rows = []
    for name in ("planned", "uniform"):
        v = plan.data["plans"].get(name)
        if v is None:
            rows.append([name, "no uniform plan meets the budget", "", "", ""])
            continue
        p = v["predicted"]
        rows.append([name, f"{p['drop']:.4f}", f"{p['size_fraction']:.3f}", f"{p['macs_fraction']:.3f}",
                     f"{p['bops_fraction']:.3f}"])
    _say(tabulate(rows, headers=["allocation", "predicted drop", "size", "MACs", "BOPs"], tablefmt="simple"))


def cmd_apply(args: argparse.Namespace) -> int:
    from sensplan.planner import Plan, apply_plan, measure_original
    from sensplan.planner._apply import check_compatible

    plan = Plan.load(args.plan)
    variants = [v for v in _variants(args) if plan.data["plans"].get(v) is not None]
    model, spec = _load_model(args)
    check_compatible(model, plan)
    loader, ft = _train(args)
    data, calib = _eval_data(args)
    check_compatible(model, plan, data.example_input)
    out = Path(args.out)
    _say("measuring the original model")
    before = measure_original(model, data, spec, timing=not args.no_timing)
    for v in variants:
        _say(f"applying the {v} allocation")
        m = apply_plan(model, plan, data, out if v == "planned" else out / v, variant=v, calib=calib,
                       train_loader=loader, finetune=ft, model_spec=spec, timing=not args.no_timing, before=before)
        _print_metrics(v, m)
    print(out)
    return 0


def _train(args: argparse.Namespace) -> tuple[Any, Any]:
    from sensplan.planner import FineTuneConfig
    from sensplan.sensitivity._data import train_loader

    if not args.train_data:
        return None, None
    ft = FineTuneConfig(epochs=args.epochs, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                        max_steps=args.max_steps, seed=args.seed)
    loader = train_loader(_data_spec(args.train_data, args), ft.batch_size, args.seed, augment=args.augment,
                          n=args.train_samples)
    return loader, ft


def _print_metrics(variant: str, m: dict[str, Any]) -> None:
    b, a = m["before"], m["after"]
    lat = ""
    if "latency" in a and "latency" in b:
        lat = f", latency p50 {b['latency']['p50_ms']:.2f} -> {a['latency']['p50_ms']:.2f} ms"
    met = ", ".join(f"{x['metric']} {'met' if x['met'] else 'MISSED'}" for x in m["budgets"])
    _say(f"  {variant}: top-1 {b['top1']:.4f} -> {a['top1']:.4f}, size {b['payload_bytes'] / 1e6:.3f} -> "
         f"{a['payload_bytes'] / 1e6:.3f} MB, MACs {b['macs'] / 1e6:.2f} -> {a['macs'] / 1e6:.2f} M{lat}"
         + (f"; budget {met}" if met else ""))


def cmd_report(args: argparse.Namespace) -> int:
    from sensplan.reports import render_report

    path = render_report(args.scan, args.out, plan=args.plan, result=args.result)
    print(path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _budgets(args)  # fail on a bad budget before anything expensive
    args.scan = str(out / "scan.json")
    args.plan = str(out / "plan.json")
    args.result = str(out / "result")
    t0 = time.perf_counter()
    steps = [("scan", cmd_scan, args.scan), ("plan", cmd_plan, args.plan), ("apply", cmd_apply, args.result)]
    for name, fn, target in steps:
        _say(f"== {name} ==")
        args.out = target
        fn(args)
    args.out = str(out / "report")
    _say("== report ==")
    cmd_report(args)
    _say(f"done in {time.perf_counter() - t0:.0f} s; open {out / 'report' / 'report.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sensplan.planner._demo import run_demo

    report = run_demo(args.out, budgets=args.budget or ["macs=0.5"], epochs=args.epochs, seed=args.seed,
                      timing=not args.no_timing)
    print(f"report: {report}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sensplan.sensitivity import list_models

    for name in list_models(args.pattern):
        print(f"sensplan:{name}")
    return 0


def _check_writable(path: str) -> None:
    parent = Path(path).resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserInputError(f"Cannot write {path!r}: {str(probe)!r} is not writable. Choose another --out.")


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensplan",
        description="Measure which layers of a PyTorch classifier can take how much pruning and quantization, "
                    "plan the best allocation for a budget, apply it, and report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="typical session:\n  sensplan scan ... --out scan.json\n  sensplan plan --scan scan.json "
               "--budget macs=0.5 --out plan.json\n  sensplan apply ... --plan plan.json --out result/\n"
               "  sensplan report --scan scan.json --plan plan.json --result result/ --out report/\n"
               "or all at once: sensplan run ...; offline demo: sensplan demo")
    parser.add_argument("--version", action="version", version=f"sensplan {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=_EPILOGS.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
        return p

    p = add("scan", "Measure the top-1 drop of quantizing each layer and pruning each channel group.")
    _model_args(p)
    _data_args(p)
    _scan_args(p)
    p.add_argument("--out", default="scan.json", help="where to write the scan table (default scan.json)")
    p.set_defaults(fn=cmd_scan)

    p = add("plan", "Solve the per-unit allocation for a budget (exact MILP), beside the uniform plan.")
    p.add_argument("--scan", required=True, help="scan.json from `sensplan scan`")
    _plan_args(p)
    p.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    p.set_defaults(fn=cmd_plan)

    p = add("apply", "Apply a plan: prune structurally, fine-tune (optional), quantize, measure, save.")
    _model_args(p)
    p.add_argument("--plan", required=True, help="plan.json from `sensplan plan`")
    _data_args(p)
    _apply_args(p)
    p.add_argument("--out", required=True, help="output directory (model.sensplan, metrics.json, plan.json)")
    p.set_defaults(fn=cmd_apply)

    p = add("report", "Render report.html and PNG charts from the artifacts (never loads a model).")
    p.add_argument("--scan", required=True, help="scan.json")
    p.add_argument("--plan", help="plan.json")
    p.add_argument("--result", help="the output directory of `sensplan apply`")
    p.add_argument("--out", default="report", help="output directory (default report/)")
    p.set_defaults(fn=cmd_report)

    p = add("run", "scan + plan + apply + report in one go, into one directory.")
    _model_args(p)
    _data_args(p)
    _scan_args(p)
    _plan_args(p)
    _apply_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_run)

    p = add("demo", "Offline demo: train a small CNN on scikit-learn's digits, then run the whole pipeline.")
    p.add_argument("--out", default="sensplan-demo", help="output directory (default sensplan-demo/)")
    p.add_argument("--budget", action="append", default=[], metavar="METRIC=VALUE", help="default macs=0.5")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after compression (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    p.set_defaults(fn=cmd_demo)

    p = add("models", "List the models in sensplan's own registry (spec sensplan:NAME).")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.fn(args))
    except UserInputError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"sensplan {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sensplan: interrupted; files already written are complete (written atomically).", file=sys.stderr)
        return 130
    except SensplanError as e:
        traceback.print_exc()
        print(f"sensplan {args.command}: internal error: {e}. Please report it with the traceback above.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
