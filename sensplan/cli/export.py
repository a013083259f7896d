"""``sensplan export``: a plan as another tool's configuration (Torch-Pruning, ONNX Runtime, ModelOpt,
llm-compressor, GPTQModel, AutoRound, NNCF, CSV). Each target is an exporter plug-in
(``sensplan.planner.export``); docs/exporters.md gives each mapping.

Most targets need only plan.json. ``torch-pruning`` (channel indices) and ``onnxruntime`` (the
compressed ONNX graph and the plan's activation scales) rebuild the plan's model from what it records
(``--model``/``--weights`` override it), and ``onnxruntime`` also draws the plan's calibration data.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sensplan._errors import UserInputError
from sensplan.cli._common import Output, PlanAsScan, Problems, add_verb, check_outputs, need, say, set_threads

if TYPE_CHECKING:
    from sensplan.cli._common import SubParsers
    from sensplan.planner import Plan
    from sensplan.planner.export import Exporter, LoadedModel

EXAMPLE = """\
  sensplan export --plan plan.json --to csv --out plan.csv
  sensplan export --plan plan.json --to torch-pruning --drop-unsupported --out pruning.json
  sensplan export --plan plan.json --to onnxruntime --out ort.json     # + ort.onnx beside it
  sensplan export --plan plan.json --to llm-compressor --out recipe.yaml
  sensplan export --plan plan.json --to gptqmodel --variant uniform --out gptq.json
  sensplan export --list
"""


def register(sub: SubParsers) -> None:
    p = add_verb(sub, "export", "Write a plan as another tool's configuration (Torch-Pruning, ONNX Runtime, "
                                "ModelOpt, llm-compressor, GPTQModel, AutoRound, NNCF, CSV).", EXAMPLE)
    p.add_argument("--plan", metavar="FILE", help="plan.json from `sensplan plan`")
    p.add_argument("--to", metavar="FORMAT", help="the target tool (`sensplan export --list` lists them)")
    p.add_argument("--out", metavar="FILE", help="the file to write (written atomically; some targets add one "
                                                 "beside it, e.g. onnxruntime's .onnx model)")
    p.add_argument("--variant", default="planned", metavar="NAME",
                   help="which allocation of the plan: planned | uniform (default planned)")
    p.add_argument("--drop-unsupported", action="store_true",
                   help="leave out what the target cannot express (listed on stderr and in the file) instead of "
                        "refusing the export")
    p.add_argument("--list", action="store_true", help="list the export targets and exit")
    g = p.add_argument_group("the model, for torch-pruning and onnxruntime (default: what the plan records)")
    g.add_argument("--model", metavar="SPEC", help="the model spec, if not the plan's (as `sensplan apply --model`)")
    g.add_argument("--weights", metavar="FILE", help="the plan's checkpoint, if it moved (checked by digest)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model factory (with --model; repeatable)")
    g.add_argument("--allow-pickle", action="store_true", help="allow a pickle:FILE model spec (trusted files only)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from sensplan.planner import Plan
    from sensplan.planner.export import by_reason, export_plan, load_exporters

    exporters = load_exporters()
    if args.list:
        for e in sorted(exporters, key=lambda e: e.name):
            need_model = " (needs the model)" if e.needs_model else ""
            print(f"{e.name}: {e.description}{need_model}")
        for b in exporters.broken:
            print(f"(failed to load: {b})")
        return 0
    problems = Problems()
    for flag in ("plan", "to", "out"):
        if not getattr(args, flag):
            problems.add(f"--{flag} is required (or --list).")
    problems.raise_if_any()
    plan = problems.check(partial(Plan.load, args.plan))
    exporter = problems.check(partial(exporters.get, args.to))
    if args.variant not in ("planned", "uniform"):
        problems.add(f"--variant takes planned or uniform. Got {args.variant!r}.")
    if args.model_arg and not args.model:
        problems.add("--model-arg only matters with --model. Add --model SPEC, or drop it.")
    out = Path(args.out)
    check_outputs(problems, [Output(out, "--out")])
    if plan is not None and exporter is not None and not problems.messages:
        have = [k for k, v in plan.data["plans"].items() if v is not None]
        if args.variant in ("planned", "uniform") and args.variant not in have:
            problems.add(f"--variant {args.variant}: the plan has no {args.variant} allocation (null: none met its "
                         f"objective). Export --variant {have[0] if have else 'planned'} instead.")
        else:
            problems.check(partial(plan.variant, args.variant))
    problems.raise_if_any()
    loader = partial(load_for_export, args, need(plan), need(exporter)) if need(exporter).needs_model else None
    result = export_plan(need(plan), args.to, out, variant=args.variant, drop_unsupported=args.drop_unsupported,
                         model_loader=loader)
    for why, items in by_reason(result.dropped).items():  # each reason once, with the choices it dropped
        say(f"dropped (--drop-unsupported) {len(items)} choice(s): {why}:")
        for d in items:
            say(f"  {d.block} ({d.label})")
    for n in result.notes:
        say(f"note: {n}")
    for name in result.extra_files:
        say(f"wrote {os.fspath(out.parent / name)}")
    print(os.fspath(out))
    return 0


def load_for_export(args: argparse.Namespace, plan: Plan, exporter: Exporter) -> LoadedModel:
    """The plan's model (or --model's), an example input, and, for an exporter that asks for it
    (``needs_calib``), the plan's calibration data (drawn again from what the plan records)."""
    import torch

    from sensplan.planner import model_from_scan, scan_sample
    from sensplan.planner.export import LoadedModel

    set_threads(args)
    scan_rec = plan.data.get("scan") or {}
    if args.model:
        from sensplan.cli._common import load_model
        from sensplan.cli.apply import check_weights_values

        model, _ = load_model(args)
        check_weights_values(args, plan, model)
    else:
        model, _ = model_from_scan(PlanAsScan(plan), weights=args.weights, allow_pickle=args.allow_pickle,
                                   purpose=f"--to {args.to}", fix="pass --model SPEC --weights FILE",
                                   in_python="export_plan(plan, ..., model=..., example_input=...)")
    model = model.eval()
    calib = None
    if exporter.needs_calib:
        rec = scan_rec.get("sample")
        if not rec or not rec.get("kind"):
            raise UserInputError(f"--to {args.to} calibrates the plan's activation quantization on the plan's data, "
                                 "but this plan does not record it. Export in Python with export_plan(..., calib=...).")
        sample, calib, _, _ = scan_sample(rec, scan_rec.get("calibration"),
                                          " Run the export where the scan's data is, or export in Python "
                                          "with export_plan(..., model=..., example_input=..., calib=...).")
        calib = calib if calib is not None else sample
        example = sample.example_input
    else:
        shape = (plan.data.get("model") or {}).get("input_shape")
        if not shape:
            raise UserInputError("The plan does not record its model's input shape. Export in Python with "
                                 "export_plan(..., model=..., example_input=...).")
        example = torch.zeros(1, *[int(v) for v in shape])
    return LoadedModel(model, example, calib)
